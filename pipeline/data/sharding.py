"""Write a dataset as reproducible WebDataset shards plus a `manifest.json`.

One tar member per modality (`rgb.png`, `thermal.png` kept 16-bit, `event.npy`, `label.png`,
`boxes.npy` / `box_labels.npy` / `box_crowd.npy` for detection, `json` for meta and source
checksums). Tars are byte-reproducible (mtime 0, fixed owner,
sorted keys, deterministic PNG encoding) so unchanged inputs keep their DVC hashes. Bad
inputs are skipped and listed with a reason; a dataset with no valid sample is an error that
names its folder. Everything is written to a temporary folder and renamed at the end, so an
interrupted run never leaves half-written shards behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds
from tqdm.auto import tqdm

from pipeline import __version__
from pipeline.artifacts import atomic_dir, read_json, write_json
from pipeline.data.image_io import can_encode_png, encode_npy, encode_png
from pipeline.data.readers.base import DatasetReader
from pipeline.data.stats import ImageStats, ModalityStats, image_stats
from pipeline.data.types import BOX_CROWD, BOX_FIELDS, BOX_LABELS, LABEL, Record, Sample, SampleError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class NoValidSamplesError(RuntimeError):
    """Raised when every input of a dataset was skipped: nothing to train on."""


@dataclass(frozen=True)
class PreparedSample:
    """A sample ready to write: tar members, source checksums, and the statistics of its
    images, all computed in the worker so the parent only writes and adds up."""

    key: str
    members: dict[str, bytes]
    sources: dict[str, dict[str, str]]
    stats: dict[str, ImageStats]
    label_pixels: dict[int, int]
    boxes: Counter[str]  # per class id, and "crowd" for ignore regions (empty without boxes)


def encode_members(sample: Sample, sources: dict[str, dict[str, str]]) -> dict[str, bytes]:
    """Tar members of a sample: PNG for 8-bit and 16-bit single-channel maps, `.npy` otherwise."""
    members: dict[str, bytes] = {}
    for name, value in sample.items():
        if isinstance(value, np.ndarray):
            if name not in BOX_FIELDS and can_encode_png(value):
                members[f"{name}.png"] = encode_png(value)
            else:
                members[f"{name}.npy"] = encode_npy(value)
    meta = {"key": sample["key"], "meta": sample.get("meta", {}), "sources": sources}
    members["json"] = json.dumps(meta, sort_keys=True).encode()
    return members


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(reader: DatasetReader, record: Record) -> PreparedSample | SampleError:
    """Load, validate and encode one record; runs in worker processes.

    Returns the error instead of raising so the parent can list the skip with its reason.
    """
    sources = {
        name: {"path": _relative(path, reader.root), "sha256": file_sha256(path)}
        for name, path in record.files.items()
        if path.is_file()
    }
    try:
        sample = reader.load(record)
        arrays = {k: v for k, v in sample.items() if isinstance(v, np.ndarray) and k not in BOX_FIELDS}
        if any(a.size == 0 for a in arrays.values()):
            raise SampleError("empty_image", f"{record.key}: an image has zero pixels")
        label_pixels: dict[int, int] = {}
        if LABEL in arrays:
            counts = np.bincount(arrays[LABEL].ravel())
            label_pixels = {int(v): int(counts[v]) for v in np.flatnonzero(counts)}
        stats = {name: image_stats(array) for name, array in arrays.items() if name != LABEL}
        return PreparedSample(record.key, encode_members(sample, sources), sources, stats, label_pixels,
                              _box_counts(sample))
    except SampleError as err:
        if err.path is None:
            err.path = str(next(iter(record.files.values()), ""))
        return err


def _box_counts(sample: Sample) -> Counter[str]:
    """Boxes per class id (targets only) and the number of crowd (ignore) boxes of a sample."""
    if BOX_LABELS not in sample:
        return Counter()
    crowd = sample[BOX_CROWD].astype(bool)
    counts = Counter(str(int(c)) for c in sample[BOX_LABELS][~crowd])
    counts["crowd"] = int(crowd.sum())
    return counts


def _per_class(counts: Counter[str], class_names: Sequence[str] | None) -> dict[str, int]:
    """Box counts for every class id (zeros included) and the crowd count."""
    ids = [str(i) for i in range(len(class_names or ()))]
    extra = sorted(set(counts) - set(ids) - {"crowd"}, key=int)
    return {i: counts.get(i, 0) for i in ids + extra} | {"crowd": counts.get("crowd", 0)}


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def _prepared_stream(
    reader: DatasetReader, records: Sequence[Record], workers: int
) -> Iterator[PreparedSample | SampleError]:
    """Prepared samples in record order (ordered `imap`, so output stays deterministic)."""
    work = partial(prepare, reader)
    if workers <= 0:
        yield from map(work, records)
        return
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        yield from pool.imap(work, records, chunksize=4)


class _ShardSink:
    """Writes `<split>-%06d.tar` files of at most `maxcount` samples, opened lazily so a split
    whose samples were all skipped leaves no empty tar behind."""

    def __init__(self, folder: Path, split: str, maxcount: int):
        self.folder, self.split, self.maxcount = folder, split, maxcount
        self.names: list[str] = []
        self._writer: wds.TarWriter | None = None
        self._count = 0

    def write(self, key: str, members: dict[str, bytes]) -> None:
        if self._writer is None or self._count >= self.maxcount:
            self.close()
            name = f"{self.split}-{len(self.names):06d}.tar"
            self._writer = wds.TarWriter(
                str(self.folder / name), user="xmodal", group="xmodal", mode=0o444, mtime=0
            )
            self.names.append(name)
            self._count = 0
        self._writer.write({"__key__": key, **members})
        self._count += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def samples_per_shard(num_records: int, max_per_shard: int, min_shards: int) -> int:
    """Shard size that gives at least `min_shards` shards (when there are enough samples),
    so every rank and dataloader worker of an evaluation run gets a shard."""
    shards = max(math.ceil(num_records / max_per_shard), min(min_shards, num_records), 1)
    return max(1, math.ceil(num_records / shards))


def shard_dataset(
    reader: DatasetReader,
    out_dir: Path | str,
    *,
    name: str,
    max_samples_per_shard: int = 256,
    min_shards_per_split: int = 8,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Shard every split of `reader` into `out_dir` and return the manifest written there."""
    with atomic_dir(out_dir) as tmp_dir:
        manifest = _write_shards(
            reader, tmp_dir, name, max_samples_per_shard, min_shards_per_split, workers, progress
        )
        write_json(tmp_dir / MANIFEST, manifest)
    return manifest


def _write_shards(
    reader: DatasetReader,
    folder: Path,
    name: str,
    max_per_shard: int,
    min_shards: int,
    workers: int,
    progress: bool,
) -> dict[str, Any]:
    stats: dict[str, ModalityStats] = defaultdict(ModalityStats)
    splits: dict[str, Any] = {}
    skipped: list[dict[str, str]] = []
    for split in reader.splits():
        records = reader.records(split)
        sink = _ShardSink(folder, split, samples_per_shard(len(records), max_per_shard, min_shards))
        digest = hashlib.sha256()
        class_pixels: Counter[int] = Counter()
        box_counts: Counter[str] = Counter()  # has "crowd" (maybe 0) once a sample had box labels
        written = 0
        bar = tqdm(total=len(records), desc=f"shard {name}/{split}", unit="img", disable=not progress)
        for result in _prepared_stream(reader, records, workers):
            bar.update()
            if isinstance(result, SampleError):
                skipped.append(_skip_entry(split, result, reader.root))
                continue
            for source, info in sorted(result.sources.items()):
                digest.update(f"{info['path']}\t{info['sha256']}\n".encode())
            class_pixels.update(result.label_pixels)
            box_counts.update(result.boxes)
            for modality, image in result.stats.items():
                stats[modality].add(image)
            sink.write(result.key, result.members)
            written += 1
        bar.close()
        sink.close()
        splits[split] = {
            "samples": written,
            "skipped": sum(1 for s in skipped if s["split"] == split),
            "shards": sink.names,
            "sources_sha256": digest.hexdigest(),
            "label_pixels": {str(k): v for k, v in sorted(class_pixels.items())} or None,
            "boxes": _per_class(box_counts, reader.class_names) if "crowd" in box_counts else None,
        }
    if not any(s["samples"] for s in splits.values()):
        reasons = Counter(s["reason"] for s in skipped)
        raise NoValidSamplesError(
            f"no valid samples in {reader.root} ({name}): "
            + (", ".join(f"{n} {r}" for r, n in reasons.items()) if reasons else "no input files found")
        )
    return {
        "format_version": FORMAT_VERSION,
        "xmodal_version": __version__,
        "dataset": name,
        **reader.info(),
        "splits": splits,
        "modalities": {m: stats[m].summary() for m in sorted(stats)},
        "skipped": skipped,
        "skipped_by_reason": dict(sorted(Counter(s["reason"] for s in skipped).items())),
    }


def _skip_entry(split: str, error: SampleError, root: Path) -> dict[str, str]:
    path = _relative(Path(error.path), root) if error.path else ""
    return {"split": split, "reason": error.reason, "file": path, "message": str(error)}


def read_manifest(shard_dir: Path | str) -> dict[str, Any]:
    return read_json(Path(shard_dir) / MANIFEST)
