import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.rgbt_sod import VT821Reader, VT5000Reader


def _gt(tree) -> np.ndarray:
    gt = np.zeros((tree.H, tree.W), np.uint8)
    gt[0, :4] = [0, 127, 128, 255]
    return gt


@pytest.fixture
def vt5000(tree):
    for split, name in (("Train", "0"), ("Test", "1")):
        tree.jpg(f"{split}/RGB/{name}.jpg", tree.flat((40, 50, 60), 3))
        tree.jpg(f"{split}/T/{name}.jpg", tree.flat(77, 3))  # grey thermal saved as RGB JPEG
        tree.png(f"{split}/GT/{name}.png", _gt(tree))
    return tree


def test_vt5000_train_and_test_with_binary_gt(vt5000):
    reader = build_reader({"reader": "vt5000", "root": str(vt5000.root)})
    assert isinstance(reader, VT5000Reader)
    assert reader.splits() == ["train", "test"]
    (sample,) = vt5000.load_split(reader, "train").values()
    assert sample["key"] == "train__0" and sample["meta"] == {"split": "train", "name": "0"}
    assert sample["rgb"][0, 0].tolist() == [40, 50, 60]
    assert sample["thermal"].dtype == np.uint8 and sample["thermal"].shape == (6, 8)
    assert (sample["thermal"] == 77).all()
    assert sample["label"].dtype == np.uint8
    assert sample["label"][0, :4].tolist() == [0, 0, 1, 1]
    assert set(np.unique(sample["label"])) == {0, 1}
    assert reader.class_names == ("background", "salient")
    assert list(vt5000.load_split(reader, "test")) == ["test__1"]


@pytest.mark.parametrize("name", ["vt821", "vt1000"])
def test_single_test_set_benchmarks_with_jpeg_gt(tree, name):
    gt = np.zeros((8, 16), np.uint8)
    gt[:, :8] = 255  # JPEG GT: block-aligned, so it binarises exactly despite ringing
    tree.jpg("RGB/12.jpg", np.full((8, 16, 3), (10, 200, 30), np.uint8))
    tree.jpg("T/12.jpg", np.full((8, 16, 3), (60, 120, 180), np.uint8))  # colour-mapped thermal
    tree.jpg("GT/12.jpg", gt, quality=90, exact=False)
    reader = build_reader({"reader": name, "root": str(tree.root)})
    assert reader.splits() == ["test"]
    (sample,) = tree.load_split(reader, "test").values()
    assert sample["key"] == "test__12"
    assert sample["thermal"].shape == (8, 16, 3)  # not grey: kept as stored
    assert (sample["label"][:, :8] == 1).all() and (sample["label"][:, 8:] == 0).all()


def test_missing_folder_is_a_clear_error(tree):
    tree.root.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="RGB"):
        VT821Reader(tree.root).records("test")
