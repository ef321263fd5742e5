"""The demo dataset: layout, determinism, atomic writes, and that it is a fair miniature
(thermal wins at night, depth separates camouflaged objects)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import rankdata

from pipeline.data import demo
from pipeline.data.demo import (
    ANIMAL,
    CLASS_NAMES,
    CONDITIONS,
    PALETTE,
    PERSON,
    generate_demo,
    render_scene,
)
from pipeline.data.image_io import read_image
from pipeline.data.readers import build_reader

SIZE = (64, 64)
TINY = dict(image_size=SIZE, num_train=3, num_val=2, num_test=3, num_pool=2, progress=False)
MODALITIES = ("rgb", "thermal", "depth", "label")
BACKGROUND = (0, 1, 2, 3)  # sky, road, building, vegetation


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("demo") / "data"
    return root, generate_demo(root, **TINY)


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def png_format(path: Path) -> tuple[int, int]:
    """(bit depth, colour type) from the IHDR chunk; colour type 0 = grey, 2 = RGB."""
    header = path.read_bytes()[24:26]
    return header[0], header[1]


def separability(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC of a threshold on one feature, either direction: 0.5 = useless, 1 = perfect."""
    ranks = rankdata(np.concatenate([positive, negative]))
    auc = (ranks[: len(positive)].sum() - len(positive) * (len(positive) + 1) / 2) / (
        len(positive) * len(negative)
    )
    return max(auc, 1 - auc)


def luminance(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(float) @ np.array([0.299, 0.587, 0.114])


def scenes(condition: str, count: int = 12, seed: int = 0) -> list[dict[str, np.ndarray]]:
    return [render_scene(np.random.default_rng([seed, i]), SIZE, condition) for i in range(count)]


# ----------------------------------------------------------------------------- files


def test_layout_names_and_classes_json(dataset):
    root, info = dataset
    for split, count in (("train", 3), ("val", 2), ("test", 3)):
        names = [f"{CONDITIONS[i % 3]}_{i:05d}.png" for i in range(count)]
        for modality in MODALITIES:
            assert sorted(p.name for p in (root / "paired" / split / modality).iterdir()) == names
        assert sorted(p.name for p in (root / "paired" / split / "boxes").iterdir()) == \
            [n.replace(".png", ".txt") for n in names]  # YOLO text boxes of the objects
    for modality in ("thermal", "depth"):
        assert sorted(p.name for p in (root / "pool" / modality).iterdir()) == [
            "day_00000.png", "dusk_00001.png"
        ]
    assert sorted(p.name for p in root.iterdir()) == ["classes.json", "paired", "pool"]

    assert json.loads((root / "classes.json").read_text()) == info
    assert info["class_names"] == list(CLASS_NAMES) == [
        "sky", "road", "building", "vegetation", "person", "car", "animal"
    ]
    assert info["palette"] == [list(c) for c in PALETTE] and len(PALETTE) == 7
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in PALETTE)
    assert info["ignore_index"] == 255
    assert info["box_class_names"] == ["person", "car", "animal"]
    assert info["thermal_units"] == "centikelvin" and info["depth_units"] == "millimetres"
    assert info["image_size"] == [64, 64] and info["seed"] == 0
    assert info["counts"] == {"train": 3, "val": 2, "test": 3, "pool_thermal": 2, "pool_depth": 2,
                              "foundation_train": 0, "foundation_val": 0}


def test_files_decode_with_their_dtypes(dataset):
    root, _ = dataset
    split = root / "paired" / "train"
    for name in ("day_00000", "dusk_00001", "night_00002"):
        rgb = read_image(split / "rgb" / f"{name}.png")
        thermal = read_image(split / "thermal" / f"{name}.png")
        depth = read_image(split / "depth" / f"{name}.png")
        label = read_image(split / "label" / f"{name}.png")
        assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
        assert thermal.dtype == np.uint16 and thermal.shape == (64, 64)
        assert depth.dtype == np.uint16 and depth.shape == (64, 64)
        assert label.dtype == np.uint8 and label.shape == (64, 64)
        formats = {m: png_format(split / m / f"{name}.png") for m in MODALITIES}
        assert formats == {"rgb": (8, 2), "thermal": (16, 0), "depth": (16, 0), "label": (8, 0)}
        assert label.max() < len(CLASS_NAMES)
        # centikelvin: between a cold sky and hot engines (about 230 K .. 340 K)
        assert 20000 < thermal.min() and thermal.max() < 36000
        # millimetres up to the 60 m range; 0 marks no return (sky, holes)
        assert (depth == 0).any() and 0 < depth.max() <= 60000
    pool = read_image(root / "pool" / "thermal" / "day_00000.png")
    assert pool.dtype == np.uint16 and pool.shape == (64, 64)


def test_paired_and_folder_readers_read_the_tree(dataset):
    root, info = dataset
    reader = build_reader(
        {"reader": "paired", "root": str(root / "paired"), "modalities": ["rgb", "thermal", "depth"],
         "class_names": info["class_names"], "ignore_index": info["ignore_index"]}
    )
    assert reader.splits() == ["test", "train", "val"]
    records = reader.records("train")
    assert [r.meta["name"] for r in records] == ["day_00000", "dusk_00001", "night_00002"]
    sample = reader.load(records[2])
    assert set(sample) >= {"rgb", "thermal", "depth", "label"}
    assert sample["thermal"].dtype == np.uint16 and sample["label"].shape == (64, 64)
    pool = build_reader({"reader": "folder", "root": str(root / "pool" / "depth"), "modality": "depth"})
    assert len(pool.records("unlabeled")) == 2


def test_same_arguments_give_identical_bytes_and_seed_changes_them(tmp_path):
    args = dict(TINY, num_train=2, num_val=1, num_test=1, num_pool=1)
    generate_demo(tmp_path / "a", **args)
    generate_demo(tmp_path / "b", **args)
    generate_demo(tmp_path / "c", seed=1, **args)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    for modality in MODALITIES:
        name = f"paired/train/{modality}/day_00000.png"
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_resizing_one_split_leaves_the_others_unchanged(tmp_path):
    args = dict(TINY, num_val=1, num_test=1, num_pool=1)
    generate_demo(tmp_path / "small", **dict(args, num_train=1))
    generate_demo(tmp_path / "large", **dict(args, num_train=3))
    for part in ("paired/val", "paired/test", "pool"):
        assert tree_digest(tmp_path / "small" / part) == tree_digest(tmp_path / "large" / part)
    same = "paired/train/rgb/day_00000.png"
    assert (tmp_path / "small" / same).read_bytes() == (tmp_path / "large" / same).read_bytes()
    # the pools are scenes of their own, not copies of labeled ones
    pool, train = (tmp_path / "large" / p / "thermal/day_00000.png" for p in ("pool", "paired/train"))
    assert pool.read_bytes() != train.read_bytes()


def test_foundation_corpus_is_rgb_only_mostly_daylight_and_its_own(tmp_path):
    corpus = {"seed": 1, "num_train": 60, "num_val": 3, "conditions": {"day": 0.7, "dusk": 0.2, "night": 0.1}}
    args = dict(TINY, num_train=1, num_val=0, num_test=0, num_pool=1)
    info = generate_demo(tmp_path / "a", **args, foundation=corpus)
    root = tmp_path / "a" / "foundation"
    assert sorted(p.name for p in root.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (root / "train").iterdir()) == ["label", "rgb"]  # no thermal, no depth
    names = sorted(p.stem for p in (root / "train" / "rgb").iterdir())
    assert len(names) == 60 and names == sorted(p.stem for p in (root / "train" / "label").iterdir())
    conditions = [name.split("_")[0] for name in names]
    assert conditions.count("day") > 30 and conditions.count("night") < 15  # drawn 70 / 20 / 10
    assert info["foundation_seed"] == 1 and info["counts"]["foundation_train"] == 60
    # the corpus has a seed of its own: changing it changes no task split or pool, and vice versa
    generate_demo(tmp_path / "b", **args, foundation={**corpus, "seed": 2})
    generate_demo(tmp_path / "c", **{**args, "seed": 5}, foundation=corpus)
    assert tree_digest(tmp_path / "a" / "paired") == tree_digest(tmp_path / "b" / "paired")
    assert tree_digest(tmp_path / "a" / "pool") == tree_digest(tmp_path / "b" / "pool")
    assert tree_digest(root) != tree_digest(tmp_path / "b" / "foundation")
    assert tree_digest(root) == tree_digest(tmp_path / "c" / "foundation")
    with pytest.raises(ValueError, match="summing to 1"):
        generate_demo(tmp_path / "d", **args, foundation={**corpus, "conditions": {"day": 0.5, "noon": 0.5}})


@pytest.mark.parametrize("size", [(100, 128), (64, 48), (0, 64), (-32, 64)])
def test_image_size_must_be_multiples_of_32(tmp_path, size):
    with pytest.raises(ValueError, match="multiples of 32"):
        generate_demo(tmp_path / "data", **dict(TINY, image_size=size))
    assert list(tmp_path.iterdir()) == []


def test_existing_root_is_replaced(tmp_path):
    root = tmp_path / "data"
    (root / "paired" / "train" / "rgb").mkdir(parents=True)
    (root / "stale.txt").write_text("old")
    (root / "paired" / "train" / "rgb" / "day_00099.png").write_bytes(b"old")
    generate_demo(root, **dict(TINY, num_train=1, num_val=1, num_test=1, num_pool=1))
    assert not (root / "stale.txt").exists()
    assert sorted(p.name for p in (root / "paired" / "train" / "rgb").iterdir()) == ["day_00000.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no staging or old tree left


@pytest.mark.parametrize("existing", [False, True])
def test_failed_run_leaves_no_half_written_tree(tmp_path, monkeypatch, existing):
    root = tmp_path / "data"
    if existing:
        root.mkdir()
        (root / "keep.txt").write_text("previous dataset")
    calls = []

    def failing_render(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("renderer broke")
        return render_scene(*args, **kwargs)

    monkeypatch.setattr(demo, "render_scene", failing_render)
    with pytest.raises(RuntimeError, match="renderer broke"):
        generate_demo(root, **TINY)
    assert len(calls) == 3
    if existing:
        assert [p.name for p in root.iterdir()] == ["keep.txt"]
        assert [p.name for p in tmp_path.iterdir()] == ["data"]
    else:
        assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- scenes


def test_render_scene_arrays():
    out = render_scene(np.random.default_rng(0), (32, 96), "dusk")
    assert out["rgb"].dtype == np.uint8 and out["rgb"].shape == (32, 96, 3)
    for key in ("thermal", "depth"):
        assert out[key].dtype == np.uint16 and out[key].shape == (32, 96)
    assert out["label"].dtype == np.uint8 and out["label"].shape == (32, 96)
    assert out["camouflaged"].dtype == bool
    with pytest.raises(ValueError, match="condition"):
        render_scene(np.random.default_rng(0), (32, 32), "noon")


def test_sensors_left_out_change_no_other():
    full = render_scene(np.random.default_rng(5), SIZE, "night")
    thermal_only = render_scene(np.random.default_rng(5), SIZE, "night", sensors=("thermal",))
    assert set(thermal_only) == {"thermal", "label", "camouflaged", "boxes", "box_labels"}
    assert np.array_equal(full["thermal"], thermal_only["thermal"])
    assert np.array_equal(full["label"], thermal_only["label"])
    assert np.array_equal(full["boxes"], thermal_only["boxes"])


def test_every_class_appears_and_labels_cover_all_pixels():
    labels = np.stack([s["label"] for s in scenes("day")])
    assert set(np.unique(labels)) == set(range(len(CLASS_NAMES)))


def test_night_rgb_is_darker_than_day():
    for i in range(6):
        day = render_scene(np.random.default_rng([3, i]), SIZE, "day")["rgb"]
        night = render_scene(np.random.default_rng([3, i]), SIZE, "night")["rgb"]
        # measured: night/day ratio of mean luminance 0.27..0.31, of its spread 0.48..0.58
        assert luminance(night).mean() < 0.5 * luminance(day).mean()
        assert luminance(night).std() < 0.7 * luminance(day).std()


def test_thermal_separates_people_and_animals_far_better_than_rgb_at_night():
    night = scenes("night")
    label = np.concatenate([s["label"].ravel() for s in night])
    warm = np.isin(label, (PERSON, ANIMAL))
    background = np.isin(label, BACKGROUND)
    assert warm.sum() > 200
    thermal = np.concatenate([s["thermal"].ravel() for s in night]).astype(float)
    lum = np.concatenate([luminance(s["rgb"]).ravel() for s in night])
    thermal_auc = separability(thermal[warm], thermal[background])
    rgb_auc = separability(lum[warm], lum[background])
    # measured (seeds 0..3): thermal 0.997..0.999, RGB luminance 0.60..0.74
    assert thermal_auc > 0.95
    assert rgb_auc < 0.82
    assert thermal_auc - rgb_auc > 0.2


def boundary_steps(scene: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Colour and relative depth differences of 4-neighbour pixel pairs, grouped as
    camouflaged object | background, other object | background, and background | same class
    background (texture and noise: what an edge must stand out from). Pairs with an invalid
    depth are left out."""
    rgb, depth = scene["rgb"].astype(float), scene["depth"].astype(float)
    label, camouflaged = scene["label"], scene["camouflaged"]
    groups = {"camouflaged": [], "plain": [], "reference": []}
    for axis in (0, 1):
        first = tuple(slice(0, -1) if a == axis else slice(None) for a in (0, 1))
        second = tuple(slice(1, None) if a == axis else slice(None) for a in (0, 1))
        for p, q in ((first, second), (second, first)):
            valid = (depth[p] > 0) & (depth[q] > 0)
            colour = np.linalg.norm(rgb[p] - rgb[q], axis=-1)
            step = np.abs(depth[p] - depth[q]) / np.maximum(np.maximum(depth[p], depth[q]), 1)
            behind = valid & np.isin(label[q], BACKGROUND)
            object_p = ~np.isin(label[p], BACKGROUND)
            masks = {
                "camouflaged": behind & camouflaged[p],
                "plain": behind & object_p & ~camouflaged[p],
                "reference": behind & (label[p] == label[q]),
            }
            for name, mask in masks.items():
                groups[name].append((colour[mask], step[mask]))
    return {k: tuple(np.concatenate(parts) for parts in zip(*v)) for k, v in groups.items()}


def test_depth_separates_objects_whose_colour_matches_the_background():
    steps = [boundary_steps(s) for s in scenes("day", seed=100)]
    pooled = {k: tuple(np.concatenate(a) for a in zip(*(s[k] for s in steps))) for k in steps[0]}
    (camo_colour, camo_depth), (plain_colour, _), (ref_colour, ref_depth) = (
        pooled["camouflaged"], pooled["plain"], pooled["reference"]
    )
    assert len(camo_colour) > 150  # the generator does make camouflaged objects
    colour_auc = separability(camo_colour, ref_colour)
    depth_auc = separability(camo_depth, ref_depth)
    plain_auc = separability(plain_colour, ref_colour)
    # measured (seeds 100..103): camouflaged colour 0.55..0.70, depth 0.95..0.97, plain
    # objects' colour 0.88..0.92
    assert colour_auc < 0.8  # a camouflaged edge hardly stands out in colour ...
    assert depth_auc > 0.9  # ... but clearly in depth
    assert depth_auc - colour_auc > 0.2
    assert plain_auc - colour_auc > 0.1  # camouflage really hides: other objects stand out
