"""DVC stage `foundation_index`: data/foundation/index.json, the foundation models the DAG builds.

It exists so that data/foundation exists even when `foundations` is empty (real weights):
every stage that builds the encoder depends on that folder.
Usage: python -m stages.foundation_index <out_file>   (reads params `foundations`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.artifacts import write_json
from pipeline.config import load_params, section

CHECKPOINT = "model.safetensors"  # pipeline/training/foundation.py (not imported: no torch here)


def main(out_file: Path) -> None:
    foundations = section(load_params(), "foundations") or {}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(out_file, {"foundations": {
        name: {"checkpoint": str(out_file.parent / name / CHECKPOINT), "description": cfg["description"],
               "backbone": cfg["backbone"], "corpus": cfg["dataset"]}
        for name, cfg in foundations.items()}})
    print(f"{out_file}: {len(foundations)} foundation model(s) {sorted(foundations)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_file", type=Path, help="e.g. data/foundation/index.json")
    main(parser.parse_args().out_file)
