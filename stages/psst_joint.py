"""DVC stage `psst_joint@<run>`: MAE + error-weighted DINO self-distillation on the subset.

Usage: python -m stages.psst_joint <run> <shard_dir> <warmup_dir> <selection_dir> <out_dir>
       [--metrics M] [--plot P]
"""

from pipeline.config import load_params
from pipeline.training.psst import run_joint
from stages import RUN_DIRS, phase_outputs, phase_parser

if __name__ == "__main__":
    args = phase_parser(__doc__, "shard_dir", "warmup_dir", "selection_dir").parse_args()
    metrics = run_joint(load_params(), args.lora, args.shard_dir, args.warmup_dir, args.selection_dir,
                        phase_outputs(args), RUN_DIRS)
    print(f"joint {args.lora}: {metrics}")
