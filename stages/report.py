"""DVC stage `report`: every task's metrics and costs -> reports/ (README tables, CSVs, figures).

Usage: python -m stages.report <tasks_dir> <lora_dir> <out_dir>   (reads no params: only stage outputs)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.report import write_report


def main(tasks_dir: Path, lora_dir: Path, out_dir: Path) -> None:
    summary = write_report(tasks_dir, lora_dir, out_dir)
    incomplete = f"; incomplete: {', '.join(summary['incomplete'])}" if summary["incomplete"] else ""
    print(f"report: {len(summary['tasks'])} task(s), {len(summary['figures'])} figure(s) -> "
          f"{out_dir / 'README.md'}{incomplete}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks_dir", type=Path, help="one sub-folder per task with model/ and eval/, e.g. data/tasks")
    parser.add_argument("lora_dir", type=Path, help="one sub-folder per modality LoRA, e.g. data/lora")
    parser.add_argument("out_dir", type=Path, help="output folder, e.g. reports")
    args = parser.parse_args()
    main(args.tasks_dir, args.lora_dir, args.out_dir)
