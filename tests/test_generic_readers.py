"""The generic layouts users point at their own data: paired folders and unlabeled folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile

from pipeline.data.image_io import encode_png
from pipeline.data.readers import build_reader
from pipeline.data.types import SampleError

H, W = 6, 8


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(array))


def paired_tree(root):
    """Two splits; `train/b` lacks its thermal file; thermal and label are 16/8-bit PNGs."""
    for split, names in {"train": ["a", "b"], "test": ["c"]}.items():
        for i, name in enumerate(names):
            write_png(root / split / "rgb" / f"{name}.png", np.full((H, W, 3), 10 * i, np.uint8))
            if name != "b":
                write_png(root / split / "thermal" / f"{name}.png", np.full((H, W), 30000 + i, np.uint16))
            write_png(root / split / "label" / f"{name}.png", np.full((H, W), i, np.uint8))


def test_paired_reader_discovers_splits_and_keeps_16bit(tmp_path):
    paired_tree(tmp_path)
    reader = build_reader({"reader": "paired", "root": str(tmp_path), "modalities": ["rgb", "thermal"]})
    assert reader.splits() == ["test", "train"]
    records = reader.records("train")
    assert [r.key for r in records] == ["train__a", "train__b"]
    sample = reader.load(records[0])
    assert sample["thermal"].dtype == np.uint16 and int(sample["thermal"][0, 0]) == 30000
    assert sample["rgb"].shape == (H, W, 3) and sample["label"].shape == (H, W)
    assert sample["meta"] == {"split": "train", "name": "a"}
    with pytest.raises(SampleError, match="thermal") as info:
        reader.load(records[1])
    assert info.value.reason == "missing_modality"


def test_paired_reader_flat_root_renamed_folders_and_classes_file(tmp_path):
    # RoadScene style: modality folders directly under root, named visible/infrared.
    write_png(tmp_path / "visible" / "x.png", np.zeros((H, W, 3), np.uint8))
    write_png(tmp_path / "infrared" / "x.png", np.full((H, W), 200, np.uint8))
    (tmp_path / "classes.json").write_text(
        json.dumps({"class_names": ["bg", "fg"], "ignore_index": 255, "palette": [[0, 0, 0], [9, 9, 9]]})
    )
    reader = build_reader({
        "reader": "paired", "root": str(tmp_path), "modalities": ["rgb", "thermal"],
        "splits": {"all": "."}, "modality_dirs": {"rgb": "visible", "thermal": "infrared"},
        "classes_file": "classes.json",
    })
    (record,) = reader.records("all")
    assert int(reader.load(record)["thermal"][0, 0]) == 200
    assert reader.info()["class_names"] == ["bg", "fg"] and reader.ignore_index == 255


def test_paired_reader_size_mismatch_is_a_sample_error(tmp_path):
    write_png(tmp_path / "s" / "rgb" / "x.png", np.zeros((H, W, 3), np.uint8))
    write_png(tmp_path / "s" / "thermal" / "x.png", np.zeros((H + 1, W), np.uint16))
    reader = build_reader({"reader": "paired", "root": str(tmp_path), "modalities": ["rgb", "thermal"]})
    with pytest.raises(SampleError, match="6x8") as info:
        reader.load(reader.records("s")[0])
    assert info.value.reason == "size_mismatch"


def test_folder_reader_any_nesting_format_and_depth(tmp_path):
    write_png(tmp_path / "a" / "b" / "grey8.png", np.full((H, W), 7, np.uint8))
    write_png(tmp_path / "grey16.png", np.full((H, W), 40000, np.uint16))
    write_png(tmp_path / "a" / "rgb8.png", np.full((H, W, 3), 5, np.uint8))
    tifffile.imwrite(tmp_path / "a" / "t16.tif", np.full((H, W), 1234, np.uint16))
    (tmp_path / "a" / "readme.txt").write_text("not an image")
    reader = build_reader({"reader": "folder", "root": str(tmp_path), "modality": "thermal"})
    records = {r.key: r for r in reader.records("unlabeled")}
    assert sorted(records) == ["a__b__grey8", "a__readme_txt", "a__rgb8", "a__t16", "grey16"]
    values = {k: reader.load(r)["thermal"] for k, r in records.items() if k != "a__readme_txt"}
    assert values["grey16"].dtype == np.uint16 and int(values["grey16"][0, 0]) == 40000
    assert int(values["a__t16"][0, 0]) == 1234 and values["a__rgb8"].shape == (H, W, 3)
    with pytest.raises(SampleError) as info:
        reader.load(records["a__readme_txt"])
    assert info.value.reason == "not_an_image"


def test_unknown_reader_and_option_errors_name_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"datasets.x.reader: unknown reader 'nope'"):
        build_reader({"reader": "nope", "root": str(tmp_path)}, where="datasets.x")
    with pytest.raises(ValueError, match=r"datasets.x: option\(s\) \['colour'\]"):
        build_reader({"reader": "folder", "root": str(tmp_path), "modality": "t", "colour": 1}, where="datasets.x")
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        build_reader({"reader": "folder", "root": str(tmp_path / "missing_dir"), "modality": "t"})
