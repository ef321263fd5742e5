"""Sharding throughput against its bound, measured side by side in one run.

    python benchmarks/shard_throughput.py [--root ../shared/data/hit_uav/images] [--workers 2]

The bound is the work sharding cannot avoid: read + decode + PNG-encode the same files with
the same number of worker processes, writing nothing. Sharding adds source checksums,
statistics, tar writing and the manifest; the ratio says what those cost. Inputs are read
once before timing so both measurements see a warm page cache.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from pipeline.data.image_io import encode_png, read_image
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hit_uav" / "images"


def decode_and_encode(path: Path) -> int:
    return len(encode_png(read_image(path)))


def bound(paths: list[Path], workers: int) -> float:
    start = time.perf_counter()
    if workers <= 0:
        for path in paths:
            decode_and_encode(path)
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap(decode_and_encode, paths, chunksize=4):
                pass
    return time.perf_counter() - start


def shard(root: Path, workers: int) -> float:
    reader = build_reader({"reader": "folder", "root": str(root), "modality": "thermal"})
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        shard_dataset(reader, Path(tmp) / "shards", name="bench", workers=workers, progress=False)
        return time.perf_counter() - start


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="folder of images to shard")
    parser.add_argument("--workers", type=int, default=2, help="worker processes for both measurements")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    reader = build_reader({"reader": "folder", "root": str(args.root), "modality": "thermal"})
    paths = [p for r in reader.records("unlabeled") for p in r.files.values()]
    total_bytes = sum(len(p.read_bytes()) for p in paths)  # warms the page cache
    print(f"{len(paths)} files, {total_bytes / 1e6:.1f} MB in {args.root}")
    print(f"device: {cpu_name()}, {os.cpu_count()} logical CPUs, workers={args.workers}")

    bounds, shards = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        bounds.append(bound(paths, args.workers))
        shards.append(shard(args.root, args.workers))
    bound_rate = len(paths) / statistics.median(bounds)
    shard_rate = len(paths) / statistics.median(shards)
    print(f"bound (read+decode+PNG-encode): {bound_rate:8.1f} images/s  (median of {args.repeats})")
    print(f"shard (full stage, tar+manifest): {shard_rate:8.1f} images/s  (median of {args.repeats})")
    print(f"ratio shard/bound: {shard_rate / bound_rate:.2f}")


if __name__ == "__main__":
    main()
