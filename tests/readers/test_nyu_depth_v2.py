import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.nyu_depth_v2 import NYUDepthV2Reader


@pytest.fixture
def nyu(tree):
    for name, depth in (("0", 54321), ("1", 1234)):
        tree.jpg(f"RGB/{name}.jpg", tree.flat((10, 200, 30), 3))
        tree.png(f"Depth/{name}.png", tree.flat(depth, dtype=np.uint16))
        tree.jpg(f"HHA/{name}.jpg", tree.flat((90, 121, 150), 3))
        tree.png(f"Label/{name}.png", tree.label_row([0, 1, 40, 41, 255]))
    tree.lines("train.txt", ["RGB/0.jpg"])  # DFormer-style line
    tree.lines("test.txt", ["1"])  # CMX-style line
    return tree


def test_reads_rgb_16bit_depth_and_shifts_labels(nyu):
    reader = build_reader({"reader": "nyu_depth_v2", "root": str(nyu.root)})
    assert reader.splits() == ["train", "test"]
    (sample,) = nyu.load_split(reader, "train").values()
    assert sample["key"] == "train__0"
    assert sample["meta"] == {"split": "train", "name": "0"}
    assert sample["rgb"].dtype == np.uint8 and sample["rgb"][2, 2].tolist() == [10, 200, 30]
    assert sample["depth"].dtype == np.uint16 and (sample["depth"] == 54321).all()
    assert sample["label"].dtype == np.uint8
    assert sample["label"][0, :5].tolist() == [255, 0, 39, 255, 255]
    assert sample["label"][5, 7] == 255  # 0 = unlabeled everywhere else
    assert "hha" not in sample


def test_cmx_style_list_and_optional_hha(nyu):
    reader = NYUDepthV2Reader(nyu.root, modalities=["depth", "hha"])
    (sample,) = nyu.load_split(reader, "test").values()
    assert sample["key"] == "test__1"
    assert (sample["depth"] == 1234).all()
    assert sample["hha"].dtype == np.uint8 and sample["hha"][0, 0].tolist() == [90, 121, 150]


def test_class_list_is_nyu40(nyu):
    reader = NYUDepthV2Reader(nyu.root)
    assert len(reader.class_names) == 40
    assert reader.class_names[0] == "wall" and reader.class_names[39] == "otherprop"
    assert reader.ignore_index == 255 and len(reader.palette) == 40


def test_missing_split_list_names_the_file(nyu):
    (nyu.root / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        NYUDepthV2Reader(nyu.root).records("test")
