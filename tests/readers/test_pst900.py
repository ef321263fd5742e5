import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.pst900 import PST900Reader
from pipeline.data.types import SampleError

NAME = "31_bag1a_rect_rgb_frame0000000007"


@pytest.fixture
def pst(tree):
    for split in ("train", "test"):
        tree.png(f"{split}/rgb/{NAME}.png", tree.flat((1, 2, 3), 3))
        tree.png(f"{split}/thermal/{NAME}.png", tree.flat(77, 3))  # 8-bit AGC, grey saved as RGB
        tree.png(f"{split}/thermal_raw/{NAME}.png", tree.flat(40000, dtype=np.uint16))
        tree.png(f"{split}/depth/{NAME}.png", tree.flat(54321, dtype=np.uint16))
        tree.png(f"{split}/labels/{NAME}.png", tree.label_row([0, 1, 4, 5]))
    tree.png("test/rgb/31_bag1a_rect_rgb_frame0000000099.png", tree.flat((1, 2, 3), 3))  # no thermal
    tree.png("test/labels/31_bag1a_rect_rgb_frame0000000099.png", tree.label_row([]))
    return tree


def test_reads_rgb_8bit_thermal_and_labels(pst):
    reader = build_reader({"reader": "pst900", "root": str(pst.root)})
    assert reader.splits() == ["train", "test"]
    (sample,) = pst.load_split(reader, "train").values()
    assert sample["key"] == f"train__{NAME}"
    assert sample["meta"] == {"split": "train", "name": NAME}
    assert sample["rgb"][0, 0].tolist() == [1, 2, 3]
    assert sample["thermal"].dtype == np.uint8 and sample["thermal"].shape == (6, 8)
    assert (sample["thermal"] == 77).all()
    assert sample["label"][0, :4].tolist() == [0, 1, 4, 255]
    assert "depth" not in sample
    assert reader.class_names == ("background", "fire_extinguisher", "backpack", "hand_drill", "survivor")


def test_raw_16bit_thermal_and_depth_keep_their_bits(pst):
    reader = PST900Reader(pst.root, modalities=["thermal", "depth"], raw_thermal=True)
    (sample,) = pst.load_split(reader, "train").values()
    assert sample["thermal"].dtype == np.uint16 and (sample["thermal"] == 40000).all()
    assert sample["depth"].dtype == np.uint16 and (sample["depth"] == 54321).all()


def test_missing_thermal_is_reported(pst):
    reader = PST900Reader(pst.root)
    records = {r.key: r for r in reader.records("test")}
    assert sorted(records) == [f"test__{NAME}", "test__31_bag1a_rect_rgb_frame0000000099"]
    with pytest.raises(SampleError) as err:
        reader.load(records["test__31_bag1a_rect_rgb_frame0000000099"])
    assert err.value.reason == "missing_modality"


def test_rejects_modalities_the_release_lacks(pst):
    with pytest.raises(ValueError, match="nir"):
        PST900Reader(pst.root, modalities=["nir"])
