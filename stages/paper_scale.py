"""DVC stage `paper_scale`: parameter counts of the method at the seed paper's scale, untrained.

Usage: python -m stages.paper_scale <out_dir>   (reads params `paper_scale`, `methods`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.artifacts import atomic_dir, write_json
from pipeline.config import load_params, section
from pipeline.efficiency import paper_scale_parameters


def main(out_dir: Path) -> None:
    params = load_params()
    counts = paper_scale_parameters(section(params, "paper_scale"), section(params, "methods"))
    with atomic_dir(out_dir) as tmp:
        write_json(tmp / "parameters.json", counts)
    print(f"paper scale ({counts['backbone']}, {len(counts['tasks'])} tasks): {counts['total'] / 1e6:.1f}M total, "
          f"{counts['trainable'] / 1e6:.1f}M trainable -> {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="e.g. data/paper_scale")
    main(parser.parse_args().out_dir)
