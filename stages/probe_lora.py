"""DVC stage `probe_lora@<run>`: a linear probe of frozen features on the modality, without and with the LoRA.

Usage: python -m stages.probe_lora <run> <shards_root> <warmup_dir> <lora_dir> <out_dir> [--metrics M]
"""

from pipeline.config import load_params
from pipeline.training.probe import run_probe
from stages import phase_outputs, phase_parser

if __name__ == "__main__":
    args = phase_parser(__doc__, "shards_root", "warmup_dir", "lora_dir").parse_args()
    metrics = run_probe(load_params(), args.lora, args.shards_root, args.warmup_dir, args.lora_dir, phase_outputs(args))
    print(f"probe {args.lora}: {metrics.get('summary', metrics.get('reason'))}")
