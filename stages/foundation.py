"""DVC stage `foundation@<name>`: pretrain a demo foundation model on its RGB-only corpus.

Usage: python -m stages.foundation <name> <shard_dir> <out_dir> [--metrics M] [--plot P]
"""

import argparse
from pathlib import Path

from pipeline.artifacts import PhaseOutputs
from pipeline.config import load_params
from pipeline.training.foundation import run_foundation
from stages import RUN_DIRS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", help="key under `foundations` in params.yaml")
    parser.add_argument("shard_dir", type=Path, help="the corpus' shards")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--metrics", type=Path, help="copy of the metrics for `dvc metrics`")
    parser.add_argument("--plot", type=Path, help="loss curve CSV for `dvc plots`")
    args = parser.parse_args()
    metrics = run_foundation(load_params(), args.name, args.shard_dir,
                             PhaseOutputs(args.out_dir, args.metrics, args.plot), RUN_DIRS)
    print(f"foundation {args.name}: {metrics['held_out']['overall']['miou']:.3f} held-out mIoU")
