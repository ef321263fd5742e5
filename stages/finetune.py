"""DVC stage `finetune@<task>`: train a task's Stage-2 method on its labeled shards.

Usage: python -m stages.finetune <task> <shard_dir> <lora_root> <out_dir> [--metrics M] [--plot P]
"""

import argparse
from pathlib import Path

from pipeline.artifacts import PhaseOutputs
from pipeline.config import load_params
from pipeline.training.tasks import run_finetune
from stages import RUN_DIRS

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", help="key under `tasks` in params.yaml")
    parser.add_argument("shard_dir", type=Path, help="the task dataset's shards")
    parser.add_argument("lora_root", type=Path, help="folder of the modality LoRAs, one sub-folder per modality")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--metrics", type=Path, help="copy of the metrics for `dvc metrics`")
    parser.add_argument("--plot", type=Path, help="loss curve CSV for `dvc plots`")
    args = parser.parse_args()
    metrics = run_finetune(load_params(), args.task, args.shard_dir, args.lora_root,
                           PhaseOutputs(args.out_dir, args.metrics, args.plot), RUN_DIRS)
    print(f"finetune {args.task}: {metrics}")
