"""DVC stage `psst_select@<run>`: score the pool by MAE reconstruction variance, keep the top.

Usage: python -m stages.psst_select <run> <shard_dir> <warmup_dir> <out_dir> [--metrics M] [--plot P]
"""

from pipeline.config import load_params
from pipeline.training.psst import run_select
from stages import phase_outputs, phase_parser

if __name__ == "__main__":
    args = phase_parser(__doc__, "shard_dir", "warmup_dir").parse_args()
    metrics = run_select(load_params(), args.lora, args.shard_dir, args.warmup_dir, phase_outputs(args))
    print(f"selection {args.lora}: {metrics}")
