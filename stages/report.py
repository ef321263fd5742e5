"""DVC stage `report`: every task's metrics and costs, Stage 1's diagnostics -> reports/ (README, CSVs, figures).

Usage: python -m stages.report <tasks_dir> <lora_dir> <out_dir> [--psst D] [--foundation D] [--paper-scale F]
(reads from params.yaml only which tasks, Stage-1 runs and foundations the DAG has; every number
comes from the stage outputs)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import PARAMS_FILE, load_params
from pipeline.report import InDag, write_report


def main(tasks_dir: Path, lora_dir: Path, out_dir: Path, psst_dir: Path | None = None,
         foundation_dir: Path | None = None, paper_scale: Path | None = None) -> None:
    dag = InDag.from_params(load_params()) if Path(PARAMS_FILE).is_file() else None
    summary = write_report(tasks_dir, lora_dir, out_dir, psst_dir=psst_dir, foundation_dir=foundation_dir,
                           paper_scale=paper_scale, dag=dag)
    incomplete = f"; incomplete: {', '.join(summary['incomplete'])}" if summary["incomplete"] else ""
    print(f"report: {len(summary['tasks'])} task(s), {len(summary['figures'])} figure(s) -> "
          f"{out_dir / 'README.md'}{incomplete}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks_dir", type=Path, help="one sub-folder per task with model/ and eval/, e.g. data/tasks")
    parser.add_argument("lora_dir", type=Path, help="the modality LoRAs, <set>/<modality> folders, e.g. data/lora")
    parser.add_argument("out_dir", type=Path, help="output folder, e.g. reports")
    parser.add_argument("--psst", type=Path, help="Stage 1's folders with their probes, e.g. data/psst")
    parser.add_argument("--foundation", type=Path, help="foundation models built by the DAG, e.g. data/foundation")
    parser.add_argument("--paper-scale", type=Path, help="paper-scale counts, e.g. data/paper_scale/parameters.json")
    args = parser.parse_args()
    main(args.tasks_dir, args.lora_dir, args.out_dir, args.psst, args.foundation, args.paper_scale)
