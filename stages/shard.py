"""DVC stage `shard@<dataset>`: a raw dataset in its native layout -> WebDataset shards.

Usage: python -m stages.shard <dataset> <out_dir>   (reads params `datasets.<dataset>`, `shard`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset


def main(dataset: str, out_dir: str) -> None:
    params = load_params()
    reader = build_reader(section(params, f"datasets.{dataset}"), where=f"datasets.{dataset}")
    manifest = shard_dataset(reader, Path(out_dir), name=dataset, **section(params, "shard"))
    counts = ", ".join(f"{split} {info['samples']}" for split, info in manifest["splits"].items())
    print(f"sharded {dataset}: {counts}; skipped {len(manifest['skipped'])} {manifest['skipped_by_reason']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset", help="key under `datasets` in params.yaml")
    parser.add_argument("out_dir", help="output folder, e.g. data/shards/<dataset>")
    args = parser.parse_args()
    main(args.dataset, args.out_dir)
