"""The `xmodal` command: small conveniences around the DVC pipeline.

`xmodal compose key=value ...` rewrites `params.yaml` from `conf/` with Hydra overrides, for
users who prefer `dvc repro` to `dvc exp run -S key=value` (which composes by itself).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline.config import write_params


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compose = commands.add_parser("compose", help="recompose params.yaml from conf/ with Hydra overrides")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. demo.seed=3 backbone=sam2_hiera_small")
    args = parser.parse_args(argv)
    if args.command == "compose":
        path = write_params(args.overrides)
        print(f"wrote {path} ({' '.join(args.overrides) or 'no overrides'})")


if __name__ == "__main__":
    main()
