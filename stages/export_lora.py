"""DVC stage `export_lora@<run>`: the frozen, reusable modality LoRA (peft folder + xmodal.json).

Usage: python -m stages.export_lora <run> <shard_dir> <warmup_dir> <joint_dir> <out_dir>
"""

from pipeline.config import load_params
from pipeline.training.psst import run_export
from stages import phase_parser

if __name__ == "__main__":
    args = phase_parser(__doc__, "shard_dir", "warmup_dir", "joint_dir").parse_args()
    provenance = run_export(load_params(), args.lora, args.shard_dir, args.warmup_dir, args.joint_dir, args.out_dir)
    print(f"exported the {args.lora} LoRA to {args.out_dir} ({provenance['lora']['parameters']} parameters)")
