"""DVC stage `evaluate@<task>`: metrics of a trained task on its evaluation split.

Usage: python -m stages.evaluate <task> <shard_dir> <model_dir> <out_dir> [--metrics M]
"""

import argparse
from pathlib import Path

from pipeline.artifacts import PhaseOutputs
from pipeline.config import load_params
from pipeline.training.tasks import run_evaluate

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="key under `tasks` in params.yaml")
    parser.add_argument("shard_dir", type=Path)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--metrics", type=Path, help="copy of the metrics for `dvc metrics`")
    args = parser.parse_args()
    metrics = run_evaluate(load_params(), args.task, args.shard_dir, args.model_dir,
                           PhaseOutputs(args.out_dir, args.metrics))
    print(f"evaluate {args.task}: {metrics['overall']}")
