"""Configuration: compose `params.yaml` from `conf/` exactly as `dvc exp run` does, and read it.

DVC (with `hydra.enabled`) composes `conf/config.yaml` with the `-S` overrides and dumps the
result to `params.yaml` before an experiment. `compose_params` reproduces that composition
(same Hydra compose call, same YAML dump), so a test can keep the committed `params.yaml`
equal to `conf/`, and `xmodal compose key=value` gives `dvc repro` users the same overrides.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

PARAMS_FILE = "params.yaml"
CONFIG_DIR = "conf"
CONFIG_NAME = "config"


def compose_params(overrides: Sequence[str] = (), config_dir: Path | str = CONFIG_DIR) -> str:
    """The YAML text DVC would write to `params.yaml` for these Hydra overrides."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(Path(config_dir).resolve()), version_base=None):
        cfg = compose(config_name=CONFIG_NAME, overrides=list(overrides))
    OmegaConf.resolve(cfg)
    return OmegaConf.to_yaml(cfg)


def write_params(overrides: Sequence[str] = (), root: Path | str = ".") -> Path:
    """Recompose `params.yaml` under `root` (atomically: temp file, then rename)."""
    root = Path(root)
    text = compose_params(overrides, root / CONFIG_DIR)
    target = root / PARAMS_FILE
    tmp = target.with_suffix(".yaml.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(target)
    return target


def load_params(path: Path | str = PARAMS_FILE) -> dict[str, Any]:
    """The composed parameters as plain dicts (what every stage reads)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run stages from the project root")
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def section(params: dict[str, Any], dotted: str) -> Any:
    """`params["a"]["b"]` for `"a.b"`, with an error that names the missing key."""
    node: Any = params
    for i, part in enumerate(dotted.split(".")):
        if not isinstance(node, dict) or part not in node:
            have = sorted(node) if isinstance(node, dict) else []
            raise KeyError(f"params.yaml has no key {'.'.join(dotted.split('.')[: i + 1])!r} (have: {have})")
        node = node[part]
    return node


def merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` applied key by key, recursively into nested mappings (what a
    Stage-1 run's `psst` overrides do to the global `psst` section)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
