import numpy as np
import pytest

from pipeline.data.readers import build_reader
from pipeline.data.readers.mcubes import MCubeSReader, aolp_from_sin_cos
from pipeline.data.types import SampleError

NAME = "outscene1208_2_0000000150"
ANGLES = np.array([0.0, np.pi / 6, np.pi / 4, np.pi / 2, 2 * np.pi / 3, 0.99 * np.pi])


def _angle_map(tree) -> np.ndarray:
    theta = np.zeros((tree.H, tree.W))
    theta[0, : len(ANGLES)] = ANGLES
    return theta


@pytest.fixture
def mcubes(tree):
    theta = _angle_map(tree)
    dolp = np.linspace(0.0, 1.0, tree.H * tree.W).reshape(tree.H, tree.W)  # float64, as released
    for name in (NAME, "outscene1208_2_0000000180"):
        tree.png(f"polL_color/{name}.png", tree.flat((10, 20, 30), 3))
        tree.npy(f"polL_aolp_sin/{name}.npy", np.sin(2 * theta))
        tree.npy(f"polL_dolp/{name}.npy", dolp)
        tree.png(f"NIR_warped/{name}.png", tree.flat(1000, dtype=np.uint16))
        tree.png(f"GT/{name}.png", tree.label_row([0, 19, 20, 255]))
    tree.npy(f"polL_aolp_cos/{NAME}.npy", np.cos(2 * theta))  # the second set lacks its cosine
    tree.lines("list_folder/train.txt", [NAME])
    tree.lines("list_folder/val.txt", ["outscene1208_2_0000000180"])
    tree.lines("list_folder/test.txt", [])
    tree.lines("list_folder/all.txt", [NAME, "outscene1208_2_0000000180"])
    return tree


def test_reads_all_modalities_and_derives_aolp(mcubes):
    reader = build_reader({"reader": "mcubes", "root": str(mcubes.root)})
    assert reader.splits() == ["train", "val", "test"]
    (sample,) = mcubes.load_split(reader, "train").values()
    assert sample["key"] == f"train__{NAME}"
    assert sample["meta"] == {"split": "train", "name": NAME}
    assert sample["rgb"][0, 0].tolist() == [10, 20, 30]
    assert sample["aolp"].dtype == np.float32 and sample["aolp"].shape == (6, 8)
    np.testing.assert_allclose(sample["aolp"][0, : len(ANGLES)], ANGLES, atol=1e-6)
    assert (sample["aolp"] >= 0).all() and (sample["aolp"] < np.pi).all()
    assert sample["dolp"].dtype == np.float32
    assert sample["dolp"][0, 0] == 0.0 and sample["dolp"][-1, -1] == 1.0
    assert sample["nir"].dtype == np.uint16 and (sample["nir"] == 1000).all()
    assert sample["label"][0, :4].tolist() == [0, 19, 255, 255]
    assert len(reader.class_names) == 20 and reader.ignore_index == 255


def test_single_angle_encoding():
    theta = np.array([[0.0, 0.5, 2.0, 3.0]])
    decoded = aolp_from_sin_cos(np.sin(theta), np.cos(theta), double_angle=False)
    np.testing.assert_allclose(decoded, theta, atol=1e-6)
    # angles just below 0 (noise) wrap into [0, pi), never onto pi itself
    wrapped = aolp_from_sin_cos(np.sin(2 * np.array([-1e-9])), np.cos(2 * np.array([-1e-9])))
    assert 0.0 <= wrapped[0] < np.pi


def test_missing_cosine_is_a_missing_aolp(mcubes):
    reader = MCubeSReader(mcubes.root)
    (record,) = reader.records("val")
    with pytest.raises(SampleError) as err:
        reader.load(record)
    assert err.value.reason == "missing_modality" and "aolp" in str(err.value)
    # without aolp the same set loads
    (sample,) = mcubes.load_split(MCubeSReader(mcubes.root, modalities=["dolp", "nir"]), "val").values()
    assert "aolp" not in sample and sample["nir"].shape == (6, 8)


def test_missing_split_list_names_the_file(mcubes):
    (mcubes.root / "list_folder" / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="test.txt"):
        MCubeSReader(mcubes.root).records("test")
