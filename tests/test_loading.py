"""Reading shards: exact decoding, broken data skipped, paired augmentation, stream splitting."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from pipeline.data import loading
from pipeline.data.image_io import encode_png
from pipeline.data.loading import (
    PairedAugment,
    collate,
    eval_stream,
    shard_urls,
    to_tensors,
    train_stream,
)
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset

H, W = 16, 24
COUNT = 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """12 samples in 4 shards; thermal is 16-bit with values above 255, label = sample index % 3."""
    tmp = tmp_path_factory.mktemp("loading")
    rng = np.random.default_rng(0)
    thermals = {}
    for i in range(COUNT):
        name = f"s{i:02d}"
        thermals[f"train__{name}"] = rng.integers(1000, 60000, size=(H, W), dtype=np.uint16)
        for modality, array in {
            "rgb": rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8),
            "thermal": thermals[f"train__{name}"],
            "label": np.full((H, W), i % 3, np.uint8),
        }.items():
            path = tmp / "raw" / "train" / modality / f"{name}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(array))
    reader = build_reader({"reader": "paired", "root": str(tmp / "raw"), "modalities": ["rgb", "thermal"]})
    shard_dataset(reader, tmp / "shards", name="t", min_shards_per_split=4, progress=False)
    return shard_urls(tmp / "shards", "train"), thermals


def test_shard_urls_error_names_folder_and_split(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'val'.*" + tmp_path.name):
        shard_urls(tmp_path, "val")


def test_several_splits_are_read_together_in_order(tmp_path):
    """`split: [train, val]` (IV-tuning trains MFNet on train + val)."""
    for name in ("val-000001.tar", "train-000000.tar", "val-000000.tar", "test-000000.tar"):
        (tmp_path / name).write_bytes(b"")
    assert [Path(u).name for u in shard_urls(tmp_path, ["train", "val"])] == [
        "train-000000.tar", "val-000000.tar", "val-000001.tar"]
    with pytest.raises(FileNotFoundError, match="'extra'"):
        shard_urls(tmp_path, ["train", "extra"])


def test_eval_stream_decodes_16bit_and_labels_exactly(shards):
    urls, thermals = shards
    samples = list(eval_stream(urls))
    assert [s["key"] for s in samples] == sorted(thermals)
    for sample in samples:
        assert sample["thermal"].shape == (1, H, W) and sample["thermal"].dtype == torch.float32
        assert torch.equal(sample["thermal"][0], torch.from_numpy(thermals[sample["key"]].astype(np.float32)))
        assert sample["rgb"].shape == (3, H, W)
        index = int(sample["key"][-2:])
        assert sample["label"].dtype == torch.int64 and bool((sample["label"] == index % 3).all())
        assert sample["meta"]["name"] == sample["key"].split("__")[1]


def test_eval_stream_splits_by_node_and_worker(shards, monkeypatch):
    urls, thermals = shards
    per_rank = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        loader = DataLoader(eval_stream(urls), batch_size=2, num_workers=2, collate_fn=collate)
        per_rank.append([k for batch in loader for k in batch["key"]])
    assert set(per_rank[0]).isdisjoint(per_rank[1])
    assert sorted(per_rank[0] + per_rank[1]) == sorted(thermals)
    assert len(per_rank[0]) == len(per_rank[1]) == COUNT // 2


def test_train_stream_has_fixed_epoch_length_over_workers(shards):
    urls, thermals = shards
    stream = train_stream(urls, epoch_samples=20, transform=PairedAugment((8, 8)), shuffle_buffer=8)
    loader = DataLoader(stream, batch_size=4, num_workers=2, collate_fn=collate)
    epochs = []
    for epoch in range(2):
        stream.set_epoch(epoch)
        epochs.append([k for batch in loader for k in batch["key"]])
    assert [len(e) for e in epochs] == [20, 20]
    assert set(epochs[0]) <= set(thermals)
    assert epochs[0] != epochs[1]  # resampled, not a replay


def test_train_stream_is_reproducible_from_its_seed(shards):
    urls, _ = shards
    keys = [[s["key"] for s in train_stream(urls, epoch_samples=15, seed=seed)] for seed in (3, 3, 4)]
    assert keys[0] == keys[1] and keys[0] != keys[2]


def test_paired_augment_moves_every_modality_and_label_together():
    torch.manual_seed(0)
    ramp = np.tile(np.linspace(0, 255, 64, dtype=np.float32), (48, 1))  # brightness rises to the right
    rgb = np.stack([ramp, ramp[::-1, ::-1], np.full_like(ramp, 9)], axis=2).astype(np.uint8)
    thermal = (3 * rgb[..., 0].astype(np.uint16) + 100).astype(np.uint16)
    label = (rgb[..., 0] >= 128).astype(np.uint8)
    augment = PairedAugment((32, 32), scale=(0.3, 0.6), hflip=0.5)
    flips = 0
    for _ in range(20):
        out = augment(to_tensors({"key": "k", "rgb": rgb, "thermal": thermal, "label": label}))
        red, heat = out["rgb"][0], out["thermal"][0]
        torch.testing.assert_close(heat, 3 * red + 100, atol=1e-2, rtol=0)  # same crop, same flip
        agree = (out["label"] == (red >= 128).long()).float().mean()
        assert agree > 0.9  # nearest-neighbour labels follow the image (up to boundary pixels)
        assert set(out["label"].unique().tolist()) <= {0, 1}
        flips += bool(red[:, 0].mean() > red[:, -1].mean())
    assert 0 < flips < 20  # flipping happens, sometimes


def _tar_with(path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_broken_member_and_broken_tar_are_skipped_and_counted(shards, tmp_path):
    urls, thermals = shards
    good = np.zeros((4, 4), np.uint8)
    broken_member = tmp_path / "train-broken-member.tar"
    _tar_with(broken_member, {
        "bad.rgb.png": b"definitely not a png", "bad.json": b'{"meta": {}}',
        "ok.rgb.png": encode_png(good), "ok.json": b'{"meta": {}}',
    })
    truncated = tmp_path / "train-truncated.tar"
    truncated.write_bytes(open(urls[0], "rb").read()[: 3 * 512 + 100])  # cut inside a member
    before = dict(loading.SKIPPED)
    samples = list(eval_stream([str(broken_member), str(truncated), *urls[1:]], required=["rgb"]))
    keys = [s["key"] for s in samples]
    assert "ok" in keys and "bad" not in keys
    assert keys[1:] == sorted(k for k in thermals if k >= "train__s03")  # later shards still read
    assert all("rgb" in s for s in samples)  # the cut sample's remains are not passed on
    assert loading.SKIPPED["broken_member"] == before.get("broken_member", 0) + 1
    assert loading.SKIPPED["tar_error"] > before.get("tar_error", 0)
    assert loading.SKIPPED["incomplete_sample"] == before.get("incomplete_sample", 0) + 1


def test_train_stream_keeps_only_selected_keys(shards):
    urls, _ = shards
    chosen = {"train__s02", "train__s07"}
    keys = [s["key"] for s in train_stream(urls, epoch_samples=10, keys=chosen)]
    assert len(keys) == 10 and set(keys) == chosen


@pytest.mark.parametrize("workers", [0, 2])
def test_resumed_epoch_continues_where_the_interrupted_one_stopped(shards, workers):
    urls, _ = shards

    def epoch_batches(batches_done: int) -> list[list[str]]:
        stream = train_stream(urls, epoch_samples=16, shuffle_buffer=8, seed=1)
        stream.set_epoch(3, batches_done=batches_done, batch_size=2)
        loader = DataLoader(stream, batch_size=2, num_workers=workers, collate_fn=collate)
        return [batch["key"] for batch in loader]

    full = epoch_batches(0)
    assert len(full) == 8
    resumed = epoch_batches(3)
    if workers == 0:
        assert resumed == full[3:]  # exactly the remaining batches, in order
    else:  # the same remaining batches; the loader restarts its round-robin at worker 0
        assert sorted(map(tuple, resumed)) == sorted(map(tuple, full[3:]))
