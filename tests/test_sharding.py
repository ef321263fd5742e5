"""Sharding: reproducible bytes, exact statistics, skipped inputs listed, atomic output."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_io import decode_png, encode_png
from pipeline.data.readers import build_reader
from pipeline.data.sharding import NoValidSamplesError, read_manifest, samples_per_shard, shard_dataset

H, W = 8, 12
RNG = np.random.default_rng(1)


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def jpeg(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture
def paired(tmp_path):
    """Five good RGB + 16-bit thermal + label triples in one split."""
    root = tmp_path / "raw"
    thermals = []
    for i in range(5):
        thermal = RNG.integers(20000, 40000, size=(H, W), dtype=np.uint16)
        thermals.append(thermal)
        write(root / "train" / "rgb" / f"s{i}.png", encode_png(RNG.integers(0, 256, (H, W, 3), dtype=np.uint8)))
        write(root / "train" / "thermal" / f"s{i}.png", encode_png(thermal))
        write(root / "train" / "label" / f"s{i}.png", encode_png(np.full((H, W), i % 3, np.uint8)))
    return root, thermals


def paired_reader(root):
    return build_reader({"reader": "paired", "root": str(root), "modalities": ["rgb", "thermal"]})


def tree_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_same_input_gives_identical_bytes_with_or_without_workers(tmp_path, paired):
    root, _ = paired
    first = shard_dataset(paired_reader(root), tmp_path / "a", name="d", progress=False)
    shard_dataset(paired_reader(root), tmp_path / "b", name="d", progress=False, workers=2)
    assert tree_bytes(tmp_path / "a") == tree_bytes(tmp_path / "b")
    # and a re-run into the same folder replaces it with the same bytes
    before = tree_bytes(tmp_path / "a")
    again = shard_dataset(paired_reader(root), tmp_path / "a", name="d", progress=False)
    assert tree_bytes(tmp_path / "a") == before and again == first


def test_members_keep_16bit_and_source_checksums(tmp_path, paired):
    root, thermals = paired
    shard_dataset(paired_reader(root), tmp_path / "out", name="d", max_samples_per_shard=2,
                  min_shards_per_split=1, progress=False)
    tars = sorted((tmp_path / "out").glob("train-*.tar"))
    assert [t.name for t in tars] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    with tarfile.open(tars[0]) as tar:
        names = tar.getnames()
        assert names[:4] == ["train__s0.json", "train__s0.label.png", "train__s0.rgb.png", "train__s0.thermal.png"]
        assert all(m.mtime == 0 for m in tar.getmembers())
        thermal = decode_png(tar.extractfile("train__s0.thermal.png").read())
        meta = json.loads(tar.extractfile("train__s0.json").read())
    assert thermal.dtype == np.uint16 and np.array_equal(thermal, thermals[0])
    source = root / "train" / "thermal" / "s0.png"
    assert meta["sources"]["thermal"] == {"path": "train/thermal/s0.png",
                                          "sha256": hashlib.sha256(source.read_bytes()).hexdigest()}


def test_manifest_statistics_are_exact(tmp_path, paired):
    root, thermals = paired
    manifest = shard_dataset(paired_reader(root), tmp_path / "out", name="d", progress=False)
    assert manifest == read_manifest(tmp_path / "out")
    stats = manifest["modalities"]["thermal"]
    values = np.stack(thermals).astype(np.float64)
    assert stats["dtype"] == "uint16" and stats["channels"] == 1 and stats["images"] == 5
    assert stats["mean"][0] == pytest.approx(values.mean(), abs=1e-5)
    assert stats["std"][0] == pytest.approx(values.std(), abs=1e-4)
    assert stats["min"][0] == values.min() and stats["max"][0] == values.max()
    # exact percentiles from the histogram: the smallest value v with P(x <= v) >= p
    flat = np.sort(values.ravel())
    assert stats["percentiles"]["p1"] == flat[int(np.ceil(0.01 * flat.size)) - 1]
    assert stats["percentiles"]["p99"] == flat[int(np.ceil(0.99 * flat.size)) - 1]
    assert manifest["splits"]["train"]["samples"] == 5
    assert manifest["splits"]["train"]["label_pixels"] == {"0": 2 * H * W, "1": 2 * H * W, "2": H * W}


def test_bad_inputs_are_skipped_and_listed(tmp_path, paired):
    root, _ = paired
    good = RNG.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    write(root / "train" / "rgb" / "cut.jpg", jpeg(good)[:300])  # truncated image
    write(root / "train" / "thermal" / "cut.png", encode_png(np.zeros((32, 32), np.uint16)))
    write(root / "train" / "label" / "cut.png", encode_png(np.zeros((32, 32), np.uint8)))
    write(root / "train" / "rgb" / "big.png", encode_png(np.zeros((H + 2, W, 3), np.uint8)))  # size mismatch
    write(root / "train" / "thermal" / "big.png", encode_png(np.zeros((H, W), np.uint16)))
    write(root / "train" / "label" / "big.png", encode_png(np.zeros((H, W), np.uint8)))
    write(root / "train" / "thermal" / "notes.txt", b"calibration notes")  # not an image
    manifest = shard_dataset(paired_reader(root), tmp_path / "out", name="d", progress=False)
    skipped = {(s["reason"], s["file"]) for s in manifest["skipped"]}
    assert skipped == {
        ("unreadable", "train/rgb/cut.jpg"),
        ("size_mismatch", "train/rgb/big.png"),
        ("not_an_image", "train/thermal/notes.txt"),
    }
    assert (manifest["splits"]["train"]["samples"], manifest["splits"]["train"]["skipped"]) == (5, 3)
    assert manifest["skipped_by_reason"] == {"not_an_image": 1, "size_mismatch": 1, "unreadable": 1}


def test_no_valid_sample_is_an_error_naming_the_folder(tmp_path):
    root = tmp_path / "thermal_pool"
    write(root / "readme.txt", b"nothing here")
    reader = build_reader({"reader": "folder", "root": str(root), "modality": "thermal"})
    with pytest.raises(NoValidSamplesError, match=r"thermal_pool.*1 not_an_image"):
        shard_dataset(reader, tmp_path / "out", name="pool", progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    reader = build_reader({"reader": "folder", "root": str(empty), "modality": "thermal"})
    with pytest.raises(NoValidSamplesError, match=r"empty.*no input files found"):
        shard_dataset(reader, tmp_path / "out", name="pool", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.tmp").exists()


def test_failure_midway_keeps_previous_shards(tmp_path, paired, monkeypatch):
    root, _ = paired
    out = tmp_path / "out"
    shard_dataset(paired_reader(root), out, name="d", progress=False)
    before = tree_bytes(out)

    reader = paired_reader(root)
    calls = {"n": 0}
    original = reader.load

    def load_then_crash(record):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # e.g. the user stops the stage
        return original(record)

    monkeypatch.setattr(reader, "load", load_then_crash)
    with pytest.raises(KeyboardInterrupt):
        shard_dataset(reader, out, name="d", progress=False)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


@pytest.mark.parametrize(
    ("records", "max_per_shard", "min_shards", "expected"),
    [(1000, 256, 8, 125), (5000, 256, 8, 250), (5, 256, 8, 1), (0, 256, 8, 1), (100, 10, 1, 10)],
)
def test_samples_per_shard(records, max_per_shard, min_shards, expected):
    assert samples_per_shard(records, max_per_shard, min_shards) == expected


def test_float_maps_are_stored_as_npy_with_moment_statistics(tmp_path):
    import tifffile

    maps = [RNG.random((H, W)).astype(np.float32) for _ in range(3)]
    for i, array in enumerate(maps):
        (tmp_path / "raw").mkdir(exist_ok=True)
        tifffile.imwrite(tmp_path / "raw" / f"m{i}.tif", array)
    reader = build_reader({"reader": "folder", "root": str(tmp_path / "raw"), "modality": "dolp"})
    manifest = shard_dataset(reader, tmp_path / "out", name="f", progress=False)
    stats = manifest["modalities"]["dolp"]
    values = np.stack(maps).astype(np.float64)
    assert stats["dtype"] == "float32" and stats["percentiles_exact"] is False
    assert stats["mean"][0] == pytest.approx(values.mean(), abs=1e-6)
    assert stats["std"][0] == pytest.approx(values.std(), abs=1e-6)
    assert stats["min"][0] == pytest.approx(values.min(), abs=1e-6)
    with tarfile.open(tmp_path / "out" / "unlabeled-000000.tar") as tar:
        assert tar.getnames() == ["m0.dolp.npy", "m0.json"]
