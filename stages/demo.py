"""DVC stage `demo`: generate the built-in demo dataset (deterministic from `demo.seed`).

Usage: python -m stages.demo <out_dir>   (reads params `demo`)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.config import load_params, section
from pipeline.data.demo import generate_demo


def main(out_dir: str) -> None:
    params = dict(section(load_params(), "demo"))
    params["image_size"] = tuple(params["image_size"])
    summary = generate_demo(Path(out_dir), **params)
    print(f"demo dataset in {out_dir}: {summary['counts']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder, e.g. data/raw/demo")
    main(parser.parse_args().out_dir)
