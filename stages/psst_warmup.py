"""DVC stage `psst_warmup@<run>`: MAE warm-up of the modality LoRA on its unlabeled pool.

Usage: python -m stages.psst_warmup <run> <shard_dir> <out_dir> [--metrics M] [--plot P]
"""

from pipeline.config import load_params
from pipeline.training.psst import run_warmup
from stages import RUN_DIRS, phase_outputs, phase_parser

if __name__ == "__main__":
    args = phase_parser(__doc__, "shard_dir").parse_args()
    metrics = run_warmup(load_params(), args.lora, args.shard_dir, phase_outputs(args), RUN_DIRS)
    print(f"warm-up {args.lora}: {metrics}")
