import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.mfnet import MFNetReader
from pipeline.data.types import SampleError


def _frame(tree, thermal_value: int) -> np.ndarray:
    """MFNet's 4-channel PNG: RGB plus thermal as the 4th channel."""
    frame = np.zeros((tree.H, tree.W, 4), np.uint8)
    frame[..., 0], frame[..., 1], frame[..., 2] = 10, 20, 30
    frame[..., 3] = thermal_value
    frame[0, 0, 3] = 250  # one distinct thermal pixel, to check the channel is not reordered
    return frame


@pytest.fixture
def mfnet(tree):
    tree.png("images/00001D.png", _frame(tree, 111))
    tree.png("images/01234N.png", _frame(tree, 222))
    tree.png("labels/00001D.png", tree.label_row([0, 1, 8, 9, 255]))
    tree.png("labels/01234N.png", tree.label_row([3]))
    tree.png("labels/00002D.png", tree.label_row([]))  # its image is missing
    tree.lines("train.txt", ["00001D"])
    tree.lines("val.txt", ["01234N"])
    tree.lines("test.txt", ["00002D"])
    return tree


def test_reads_rgb_thermal_from_the_4_channel_png(mfnet):
    reader = build_reader({"reader": "mfnet", "root": str(mfnet.root)})
    assert isinstance(reader, MFNetReader)
    assert reader.splits() == ["train", "val", "test"]

    (sample,) = mfnet.load_split(reader, "train").values()
    assert sample["key"] == "train__00001D"
    assert sample["rgb"].dtype == np.uint8 and sample["rgb"].shape == (6, 8, 3)
    assert sample["rgb"][3, 4].tolist() == [10, 20, 30]
    assert sample["thermal"].dtype == np.uint8 and sample["thermal"].shape == (6, 8)
    assert sample["thermal"][0, 0] == 250 and sample["thermal"][1, 1] == 111
    assert sample["meta"] == {"split": "train", "name": "00001D", "condition": "day"}


def test_unlabeled_is_a_class_and_out_of_range_ids_are_ignored(mfnet):
    reader = MFNetReader(mfnet.root)
    (sample,) = mfnet.load_split(reader, "train").values()
    assert sample["label"].dtype == np.uint8
    assert sample["label"][0, :5].tolist() == [0, 1, 8, 255, 255]
    assert reader.class_names[0] == "unlabeled" and len(reader.class_names) == 9
    assert reader.ignore_index == 255


def test_night_condition_and_missing_image(mfnet):
    reader = MFNetReader(mfnet.root)
    (night,) = mfnet.load_split(reader, "val").values()
    assert night["key"] == "val__01234N" and night["meta"]["condition"] == "night"
    assert night["thermal"][1, 1] == 222 and night["label"][0, 0] == 3

    (record,) = reader.records("test")
    with pytest.raises(SampleError) as err:
        reader.load(record)
    assert err.value.reason == "missing_modality"


def test_missing_split_list_names_the_file(mfnet):
    (mfnet.root / "val.txt").unlink()
    with pytest.raises(FileNotFoundError, match="val.txt"):
        MFNetReader(mfnet.root).records("val")
