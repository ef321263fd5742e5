import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.sun_rgbd import SunRgbdReader, decode_sunrgbd_depth
from pipeline.data.types import SampleError


def rotate_left_3(mm: np.ndarray) -> np.ndarray:
    """How the release stores millimetres (the inverse of the toolbox's decode)."""
    mm = mm.astype(np.uint16)
    return (mm << 3) | (mm >> 13)


def test_bit_rotation_decode_exact_numbers():
    stored = np.array([9872, 41358, 0, 8, 1], np.uint16)
    decoded = decode_sunrgbd_depth(stored)
    assert decoded.dtype == np.uint16
    assert decoded.tolist() == [1234, 54321, 0, 1, 8192]
    assert rotate_left_3(np.array([1234, 54321], np.uint16)).tolist() == [9872, 41358]


@pytest.fixture
def flat_tree(tree):
    tree.jpg("RGB/img-000001.jpg", tree.flat((40, 50, 60), 3))
    tree.png("Depth/img-000001.png", tree.flat(9872, dtype=np.uint16))
    tree.png("labels/img-000001.png", tree.label_row([0, 1, 37, 38]))
    tree.lines("train.txt", ["RGB/img-000001.jpg"])
    tree.lines("test.txt", [])
    return tree


def test_flat_layout_keeps_depth_as_stored_by_default(flat_tree):
    reader = build_reader({"reader": "sun_rgbd", "root": str(flat_tree.root)})
    assert reader.splits() == ["train", "test"]
    (sample,) = flat_tree.load_split(reader, "train").values()
    assert sample["key"] == "train__img-000001"
    assert sample["rgb"][0, 0].tolist() == [40, 50, 60]
    assert sample["depth"].dtype == np.uint16 and (sample["depth"] == 9872).all()
    assert sample["label"][0, :4].tolist() == [255, 0, 36, 255]
    assert len(reader.class_names) == 37 and reader.class_names[36] == "bag"
    assert flat_tree.load_split(reader, "test") == {}


def test_flat_layout_can_decode_release_depth(flat_tree):
    reader = SunRgbdReader(flat_tree.root, decode_depth=True)
    (sample,) = flat_tree.load_split(reader, "train").values()
    assert (sample["depth"] == 1234).all()


KV1 = "SUNRGBD/kv1/NYUdata/NYU0001"
KV2 = "SUNRGBD/kv2/kinect2data/000065_2014-05-16_20-14-38_260595134347_rgbf000121-resize"


@pytest.fixture
def release(tree):
    raw = tree.flat(0, dtype=np.uint16)
    raw[0, :2] = rotate_left_3(np.array([1234, 54321]))
    bfx = tree.flat(int(rotate_left_3(np.array([2000]))[0]), dtype=np.uint16)
    tree.jpg(f"{KV1}/image/NYU0001.jpg", tree.flat((40, 50, 60), 3))
    tree.png(f"{KV1}/depth/NYU0001.png", raw)
    tree.png(f"{KV1}/depth_bfx/NYU0001.png", bfx)
    tree.jpg(f"{KV2}/image/0000121.jpg", tree.flat((60, 120, 180), 3))
    tree.png(f"{KV2}/depth_bfx/0000121_abs.png", bfx)  # named unlike the frame: the only file wins
    tree.png(f"{KV2}/depth/0000121.png", raw)
    tree.lines("sunrgbd_training_images.txt", [f"{KV2}/image/0000121.jpg"])
    missing = "SUNRGBD/kv1/NYUdata/NYU0002/image/NYU0002.jpg"  # listed, not on disk
    tree.lines("sunrgbd_testing_images.txt", [f"{KV1}/image/NYU0001.jpg", missing])
    return tree


def test_release_layout_decodes_depth_to_millimetres(release):
    reader = SunRgbdReader(release.root, layout="release")
    assert reader.splits() == ["train", "test"]
    (train,) = release.load_split(reader, "train").values()
    assert train["key"] == "train__" + KV2.replace("/", "__")
    assert train["meta"]["sensor"] == "kv2" and train["meta"]["scene"] == KV2
    assert train["rgb"][0, 0].tolist() == [60, 120, 180]
    assert train["depth"].dtype == np.uint16 and (train["depth"] == 2000).all()
    assert "label" not in train

    raw = SunRgbdReader(release.root, layout="release", depth_source="depth")
    records = {r.key: r for r in raw.records("test")}
    sample = raw.load(records["test__" + KV1.replace("/", "__")])
    assert sample["depth"][0, :3].tolist() == [1234, 54321, 0]


def test_release_layout_reports_a_listed_frame_that_is_missing(release):
    reader = SunRgbdReader(release.root, layout="release")
    records = {r.key: r for r in reader.records("test")}
    with pytest.raises(SampleError) as err:
        reader.load(records["test__SUNRGBD__kv1__NYUdata__NYU0002"])
    assert err.value.reason == "missing_modality"


def test_release_layout_needs_the_split_lists(release):
    (release.root / "sunrgbd_testing_images.txt").unlink()
    with pytest.raises(FileNotFoundError, match="sunrgbd_testing_images.txt"):
        SunRgbdReader(release.root, layout="release").records("test")
