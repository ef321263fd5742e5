"""The `xmodal` command: small conveniences around the DVC pipeline.

`xmodal compose key=value ...` rewrites `params.yaml` from `conf/` with Hydra overrides, for
users who prefer `dvc repro` to `dvc exp run -S key=value` (which composes by itself).
`xmodal predict MODEL_DIR INPUT_DIR OUT_DIR --reader NAME [--option key=value ...]` runs a
trained task (e.g. `data/tasks/rgbt_seg/model`) on a folder in any reader's layout.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import yaml

from pipeline.config import write_params


def _option(text: str) -> tuple[str, object]:
    """`key=value` with a YAML value (`modalities=[rgb,thermal]`, `recursive=true`)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key, yaml.safe_load(value)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="xmodal", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    compose = commands.add_parser("compose", help="recompose params.yaml from conf/ with Hydra overrides")
    compose.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. demo.seed=3 backbone=sam2_hiera_small")
    predict = commands.add_parser("predict", help="predict a folder of inputs with a trained task")
    predict.add_argument("model_dir", type=Path, help="a finetune output, e.g. data/tasks/rgbt_seg/model")
    predict.add_argument("input_dir", type=Path, help="the inputs, in the layout of --reader")
    predict.add_argument("out_dir", type=Path, help="where the prediction PNGs go (replaced when complete)")
    predict.add_argument("--reader", default="paired", help="dataset layout (paired, mfnet, pst900, vt5000, ...)")
    predict.add_argument("--option", type=_option, action="append", default=[], metavar="KEY=VALUE",
                         help="reader option, e.g. modalities=[rgb,thermal]")
    predict.add_argument("--split", action="append", help="only these splits (default: all the reader finds)")
    args = parser.parse_args(argv)
    if args.command == "compose":
        path = write_params(args.overrides)
        print(f"wrote {path} ({' '.join(args.overrides) or 'no overrides'})")
    elif args.command == "predict":
        from pipeline.predict import predict_folder  # torch and the models load only for this command

        config = {"reader": args.reader, "root": str(args.input_dir), **dict(args.option)}
        summary = predict_folder(args.model_dir, config, args.out_dir, splits=args.split)
        print(f"wrote {summary['written']} predictions to {args.out_dir}; skipped {summary['skipped'] or 'none'}")


if __name__ == "__main__":
    main()
