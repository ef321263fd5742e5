import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.deliver import DeliverReader
from pipeline.data.types import SampleError

SEQ = "MAP_10_point102"
LOWRES = "MAP_4_point12_eventlowres"


def _files(tree, condition, split, sequence, frame, depth, event, lidar=True):
    base = f"{condition}/{split}/{sequence}/{frame}"
    tree.png(f"img/{base}_rgb_front.png", tree.flat((10, 20, 30), 3))
    tree.png(f"depth/{base}_depth_front.png", depth)
    tree.png(f"hha/{base}_depth_front.png", tree.flat((5, 6, 7), 3))
    tree.png(f"event/{base}_event_front.png", event)
    if lidar:
        tree.png(f"lidar/{base}_lidar_front.png", tree.flat(33, 3))
    semantic = np.zeros((tree.H, tree.W, 3), np.uint8)  # class id in the first channel
    semantic[0, :5, 0] = [0, 1, 25, 26, 255]
    semantic[..., 1] = 99
    tree.png(f"semantic/{base}_semantic_front.png", semantic)


@pytest.fixture
def deliver(tree):
    carla = np.zeros((tree.H, tree.W, 3), np.uint8)
    carla[0, 0] = (255, 255, 255)  # int24 max -> 1000 m
    carla[0, 1] = (1, 0, 0)  # 1 / (2^24 - 1) km
    carla[0, 2] = (0, 0, 128)  # 128 * 65536 / (2^24 - 1) km
    _files(tree, "cloud", "train", SEQ, "045050", tree.flat(12345, dtype=np.uint16), tree.flat(200))
    _files(tree, "night", "val", LOWRES, "157550", carla, np.full((3, 4), 9, np.uint8))
    _files(tree, "sun", "test", SEQ, "000100", tree.flat(1, dtype=np.uint16), tree.flat(0), lidar=False)
    return tree


def test_reads_all_modalities_with_condition_meta(deliver):
    reader = build_reader({"reader": "deliver", "root": str(deliver.root)})
    assert reader.splits() == ["train", "val", "test"]
    (sample,) = deliver.load_split(reader, "train").values()
    assert sample["key"] == f"train__cloud__{SEQ}__045050"
    assert sample["meta"]["condition"] == "cloud" and sample["meta"]["case"] is None
    assert sample["meta"]["sequence"] == SEQ and sample["meta"]["frame"] == "045050"
    assert sample["meta"]["depth_encoding"] == "as_stored"
    assert sample["rgb"][0, 0].tolist() == [10, 20, 30]
    assert sample["depth"].dtype == np.uint16 and (sample["depth"] == 12345).all()
    assert sample["event"].shape == (6, 8) and (sample["event"] == 200).all()
    assert sample["lidar"].shape == (6, 8) and (sample["lidar"] == 33).all()
    assert sample["label"].dtype == np.uint8
    assert sample["label"][0, :5].tolist() == [255, 0, 24, 255, 255]
    assert "hha" not in sample and len(reader.class_names) == 25


def test_carla_depth_and_low_resolution_events(deliver):
    reader = DeliverReader(deliver.root, modalities=["depth", "event", "hha"])
    (sample,) = deliver.load_split(reader, "val").values()
    assert sample["meta"]["case"] == "eventlowres" and sample["meta"]["condition"] == "night"
    assert sample["meta"]["depth_encoding"] == "carla_rgb24_to_metres"
    depth = sample["depth"]
    assert depth.dtype == np.float32
    assert depth[0, 0] == np.float32(1000.0) and depth[0, 3] == 0.0
    assert depth[0, 1] == np.float32(1000.0 / (256**3 - 1))
    assert depth[0, 2] == np.float32(128 * 65536 * 1000.0 / (256**3 - 1))
    assert sample["meta"]["event_size"] == [3, 4]
    assert sample["event"].shape == (6, 8) and (sample["event"] == 9).all()
    assert sample["hha"][0, 0].tolist() == [5, 6, 7]


def test_missing_lidar_is_reported(deliver):
    reader = DeliverReader(deliver.root)
    (record,) = reader.records("test")
    with pytest.raises(SampleError) as err:
        reader.load(record)
    assert err.value.reason == "missing_modality" and "lidar" in str(err.value)
    (sample,) = deliver.load_split(DeliverReader(deliver.root, modalities=["depth"]), "test").values()
    assert sample["meta"]["condition"] == "sun" and (sample["depth"] == 1).all()
