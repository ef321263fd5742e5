"""Reading shards back: exact decoding, paired augmentation, training and evaluation streams.

Training streams resample shards with replacement (`ResampledShards`) and cut a fixed number
of samples per epoch, split evenly over ranks and dataloader workers, so an "epoch" means the
same amount of work on 1 GPU and on 64. Evaluation streams visit every shard exactly once,
split by node then by worker, with no shuffling. A broken member or tar is skipped, counted
and logged, never fatal for the epoch.
"""

from __future__ import annotations

import json
import logging
import math
import tarfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torchvision import tv_tensors
from torchvision.transforms import v2

from pipeline.data.image_io import decode_npy, decode_png
from pipeline.data.types import BOX_CROWD, BOX_FIELDS, BOX_LABELS, BOXES, LABEL, Sample

log = logging.getLogger(__name__)

Transform = Callable[[Sample], Sample]

# Per-process counts of what was skipped while reading shards, by reason.
SKIPPED: Counter[str] = Counter()


def shard_urls(shard_dir: Path | str, split: str | Sequence[str]) -> list[str]:
    """The tar files of one split, or of several (e.g. [train, val]: a paper that trains on
    both), sorted per split; a clear error when a split has none."""
    shard_dir = Path(shard_dir)
    urls = []
    for name in [split] if isinstance(split, str) else split:
        found = sorted(str(p) for p in shard_dir.glob(f"{name}-*.tar"))
        if not found:
            raise FileNotFoundError(f"no shards for split {name!r} in {shard_dir}")
        urls += found
    return urls


def shard_keys(urls: Sequence[str]) -> list[str]:
    """Sample keys of a set of shards, read from tar member names (no decoding)."""
    keys: set[str] = set()
    for url in urls:
        with tarfile.open(url) as tar:
            keys.update(name.split(".", 1)[0] for name in tar.getnames())
    return sorted(keys)


def decode_sample(raw: dict[str, Any]) -> Sample | None:
    """Decode a raw WebDataset sample; None (counted, logged) when a member is broken.

    PNG members keep their channel count and bit depth (the stock `rgb8` decoder would turn a
    16-bit thermal image into 8-bit RGB); `.npy` members come back bit-exact.
    """
    sample: Sample = {"key": raw["__key__"]}
    try:
        for member, data in raw.items():
            if member.startswith("__"):
                continue
            if member.endswith(".png"):
                sample[member[: -len(".png")]] = decode_png(data)
            elif member.endswith(".npy"):
                sample[member[: -len(".npy")]] = decode_npy(data)
            elif member == "json":
                sample["meta"] = json.loads(data)["meta"]
    except Exception as err:  # any decoder error: skip the sample, keep the epoch going
        SKIPPED["broken_member"] += 1
        log.warning("skipping sample %s in %s: cannot decode %s (%s)",
                    raw.get("__key__"), raw.get("__url__"), member, err)
        return None
    return sample


def _skip_broken_tar(err: Exception) -> bool:
    """WebDataset handler: log and continue past unreadable tars or tar members."""
    SKIPPED["tar_error"] += 1
    log.warning("skipping unreadable shard data: %s", err)
    return True


class _Decode:
    """Decode raw samples to tensors, skipping (and counting) broken or incomplete ones: a tar
    cut short yields a sample without some members, which would otherwise crash a batch."""

    def __init__(self, required: Sequence[str]):
        self.required = tuple(required)

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[Sample]:
        for raw in source:
            sample = decode_sample(raw)
            if sample is None:
                continue
            missing = [name for name in self.required if name not in sample]
            if missing:
                SKIPPED["incomplete_sample"] += 1
                log.warning("skipping sample %s in %s: no %s", raw.get("__key__"), raw.get("__url__"), missing)
                continue
            yield to_tensors(sample)


class _Map:
    """A pipeline stage applying `transform`; unlike `wds.map` it adds no `__key__` entry,
    and unlike a lambda it pickles, for dataloader workers started with `spawn`."""

    def __init__(self, transform: Transform):
        self.transform = transform

    def __call__(self, source: Iterable[Sample]) -> Iterator[Sample]:
        return (self.transform(sample) for sample in source)


def to_tensors(sample: Sample) -> Sample:
    """Arrays to CxHxW float32 tensors in raw units (uint16 values are exact in float32), the
    label to an int64 HxW `Mask`, boxes to xyxy `BoundingBoxes` on the images' canvas (their
    labels and crowd flags to plain tensors), so geometric transforms treat each kind correctly."""
    out: Sample = {}
    for name, value in sample.items():
        if not isinstance(value, np.ndarray) or name in BOX_FIELDS:
            out[name] = value
        elif name == LABEL:
            out[name] = tv_tensors.Mask(torch.from_numpy(value.astype(np.int64)))
        else:
            array = value[..., None] if value.ndim == 2 else value
            chw = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)).astype(np.float32))
            out[name] = tv_tensors.Image(chw)
    if BOXES in sample:
        canvas = next(v.shape[:2] for k, v in sample.items() if isinstance(v, np.ndarray) and k not in BOX_FIELDS)
        out[BOXES] = tv_tensors.BoundingBoxes(torch.from_numpy(sample[BOXES]).reshape(-1, 4), format="XYXY",
                                              canvas_size=tuple(canvas))
        out[BOX_LABELS] = torch.from_numpy(sample[BOX_LABELS].astype(np.int64))
        out[BOX_CROWD] = torch.from_numpy(sample[BOX_CROWD].astype(bool))
    return out


_SANITIZE = v2.SanitizeBoundingBoxes(labels_getter=lambda boxes: (boxes[BOX_LABELS], boxes[BOX_CROWD]))


def sanitize_boxes(sample: Sample) -> Sample:
    """After a crop or resize: drop boxes left under 1 pixel wide or high (cut away or shrunk
    to nothing) with their labels and crowd flags; the crop already clipped the rest."""
    if BOXES not in sample:
        return sample
    kept = _SANITIZE({name: sample[name] for name in BOX_FIELDS})
    return {**sample, **kept}


class PairedAugment:
    """Random resized crop + horizontal flip with one draw of parameters per sample, applied
    identically to every modality (bilinear), the label (nearest) and the boxes (moved, clipped,
    and dropped when cut away: `sanitize_boxes`)."""

    def __init__(
        self,
        size: Sequence[int],
        scale: Sequence[float] = (0.5, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        hflip: float = 0.5,
    ):
        self.transform = v2.Compose(
            [
                v2.RandomResizedCrop(tuple(size), scale=tuple(scale), ratio=tuple(ratio), antialias=True),
                v2.RandomHorizontalFlip(hflip),
            ]
        )

    def __call__(self, sample: Sample) -> Sample:
        return sanitize_boxes(self.transform(sample))


class Resize:
    """Evaluation-time resize to a fixed size (labels nearest)."""

    def __init__(self, size: Sequence[int]):
        self.transform = v2.Resize(tuple(size), antialias=True)

    def __call__(self, sample: Sample) -> Sample:
        return sanitize_boxes(self.transform(sample))


class _EpochShare:
    """Yield this rank-and-worker's share of a fixed-length epoch from an endless stream,
    skipping the batches a resumed run already trained on in this epoch."""

    def __init__(self, epoch_samples: int):
        self.epoch_samples = epoch_samples
        self.batches_done = 0
        self.batch_size = 1

    def __call__(self, source: Iterable[Sample]) -> Iterator[Sample]:
        _, world_size, worker, num_workers = wds.utils.pytorch_worker_info()
        share = math.ceil(self.epoch_samples / (world_size * num_workers))
        # A DataLoader takes batches from its workers in turn: worker w made batches w, w+K, ...
        done = max(0, math.ceil((self.batches_done - worker) / num_workers))
        return islice(source, min(share, done * self.batch_size), share)


class TrainStream(wds.DataPipeline):
    """A training pipeline with `set_epoch`: dataloader workers are rebuilt from a pickled copy
    every epoch, so without it each epoch would replay the same shard draws and shuffle."""

    def __init__(self, *stages: Any, shards: wds.ResampledShards, shuffle: wds.detshuffle, share: _EpochShare):
        super().__init__(*stages)
        self._seeded = (shards, shuffle)
        self._share = share

    def set_epoch(self, epoch: int, batches_done: int = 0, batch_size: int = 1) -> None:
        """Seed the epoch's draws; a run resumed mid-epoch passes the batches it already did,
        so it continues with the batches an uninterrupted run had left (with several
        dataloader workers, in a different order: the loader restarts at worker 0)."""
        for stage in self._seeded:
            stage.epoch = epoch - 1  # both stages increment before use
        self._share.batches_done, self._share.batch_size = batches_done, batch_size


class _KeepKeys:
    """Pass only samples whose key is in `keys` (before decoding, so the rest cost nothing)."""

    def __init__(self, keys: Collection[str]):
        self.keys = frozenset(keys)

    def __call__(self, source: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        return (raw for raw in source if raw["__key__"] in self.keys)


def train_stream(
    urls: Sequence[str],
    *,
    epoch_samples: int,
    transform: Transform | None = None,
    required: Sequence[str] = (),
    keys: Collection[str] | None = None,
    shuffle_buffer: int = 256,
    seed: int = 0,
) -> TrainStream:
    """Endless resampled stream cut to `epoch_samples` per epoch (summed over all ranks and
    workers). Each rank/worker draws shards with its own seed derived from `seed` and the epoch
    (call `set_epoch` at every epoch start). Samples lacking a `required` member are skipped;
    with `keys`, only those samples are used (e.g. a selected subset)."""
    shards = wds.ResampledShards(list(urls), seed=seed, deterministic=True)
    shuffle = wds.detshuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=seed)
    stages: list[Any] = [shards, wds.tarfile_to_samples(handler=_skip_broken_tar)]
    if keys is not None:
        stages.append(_KeepKeys(keys))
    stages += [shuffle, _Decode(required)]
    if transform is not None:
        stages.append(_Map(transform))
    share = _EpochShare(epoch_samples)
    stages.append(share)
    return TrainStream(*stages, shards=shards, shuffle=shuffle, share=share)


def eval_stream(
    urls: Sequence[str], *, transform: Transform | None = None, required: Sequence[str] = ()
) -> wds.DataPipeline:
    """Every shard once, in order, split by node then by dataloader worker."""
    _warn_if_too_few_shards(urls)
    stages: list[Any] = [
        wds.SimpleShardList(list(urls)),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_skip_broken_tar),
        _Decode(required),
    ]
    if transform is not None:
        stages.append(_Map(transform))
    return wds.DataPipeline(*stages)


def _warn_if_too_few_shards(urls: Sequence[str]) -> None:
    _, world_size, _, _ = wds.utils.pytorch_worker_info()
    if len(urls) < world_size:
        log.warning("%d shards for %d ranks: some ranks evaluate nothing; reshard with more "
                    "shards (shard.min_shards_per_split)", len(urls), world_size)


def collate(samples: Sequence[Sample]) -> dict[str, Any]:
    """Stack tensors of equal shape; keep keys, meta and boxes (a count per sample) as lists."""
    batch: dict[str, Any] = {}
    for name in samples[0]:
        values = [s[name] for s in samples]
        if isinstance(values[0], torch.Tensor) and name not in BOX_FIELDS:
            batch[name] = torch.stack([torch.as_tensor(v) for v in values])
        else:
            batch[name] = values
    return batch
