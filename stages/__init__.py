"""One thin module per DVC stage: parse arguments, read params.yaml, call pipeline/, print."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.artifacts import PhaseOutputs

# Where training stages keep what DVC does not track: resumable checkpoints and logger output.
RUN_DIRS = {"checkpoints": Path("checkpoints"), "logs": Path("logs")}


def phase_parser(doc: str, *inputs: str) -> argparse.ArgumentParser:
    """Arguments of a Stage-1 stage: the run, input folders, output folder, report files."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("lora", help="key under `loras` in params.yaml (a Stage-1 run)")
    for name in (*inputs, "out_dir"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--metrics", type=Path, help="copy of the metrics for `dvc metrics`")
    parser.add_argument("--plot", type=Path, help="CSV for `dvc plots`")
    return parser


def phase_outputs(args: argparse.Namespace) -> PhaseOutputs:
    return PhaseOutputs(args.out_dir, args.metrics, args.plot)
