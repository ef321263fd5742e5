"""The one-shot GPU suite end to end in its tiny mode on the CPU (benchmarks/gpu_suite.py), and the
measuring pieces it is built from (pipeline/benchmarking.py)."""

from __future__ import annotations

import json
import logging
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

from pipeline.benchmarking import count_flops, largest_batch, time_side_by_side
from tests.conftest import REPO

SUITE = REPO / "benchmarks" / "gpu_suite.py"
SECTIONS = ("stage2", "largest_batch", "seed_methods", "psst_joint", "scoring", "evaluation", "levers", "loader")


def run_suite(monkeypatch, *args: str) -> None:
    """`python benchmarks/gpu_suite.py ARGS`, in this process (the imports are already paid for)."""
    monkeypatch.setattr(sys, "argv", [str(SUITE), *args])
    with warnings.catch_warnings():  # the suite silences warnings and logging for itself only
        try:
            runpy.run_path(str(SUITE), run_name="__main__")
        finally:
            logging.disable(logging.NOTSET)


def small_msrs(root: Path, shared: Path, pairs: int = 8) -> Path:
    """The MSRS release layout with the first `pairs` real pairs (links, nothing copied)."""
    source = shared / "msrs_rgbt_det"
    names = sorted(p.name for p in (source / "visible").iterdir())[:pairs]
    for folder in ("visible", "infrared", "labels/fusion"):
        (root / folder).mkdir(parents=True)
        for name in names:
            file = name if folder != "labels/fusion" else Path(name).with_suffix(".txt").name
            (root / folder / file).symlink_to(source / folder / file)
    return root


@pytest.mark.slow
def test_tiny_suite_runs_every_section_and_writes_one_json(tmp_path, shared_data, monkeypatch):
    data = small_msrs(tmp_path / "msrs", shared_data)
    out = tmp_path / "suite.json"
    run_suite(monkeypatch, "--tiny", "--out", str(out), "--data", str(data), "--workers", "0")
    results = json.loads(out.read_text())
    assert results["errors"] == [] and results["skipped"] == []
    assert results["tiny"] and "random" in results["weights"] and results["device"].startswith("CPU")
    stage2 = results["stage2"]
    assert [len(r["streams"]) for r in stage2] == [2, 3]
    for row in stage2:
        assert row["step_ms"] > 0 and row["floor_ms"] > 0
        assert row["step_over_floor"] == pytest.approx(row["step_ms"] / row["floor_ms"], rel=1e-2)
        assert row["images_per_second"] == pytest.approx(row["batch"] / row["step_ms"] * 1000, rel=1e-2)
        assert row["flops_per_step"] > 0 and row["mfu"] is None  # no bf16 peak is known for a CPU
    for row in results["largest_batch"]:  # a CPU has memory for the tiny search limit
        assert (row["plain"], row["activation_checkpointing"], row["search_limit"]) == (2, 2, 2)
    assert [r["streams"] for r in results["largest_batch"]] == [r["streams"] for r in stage2]
    assert stage2[1]["flops_per_step"] > stage2[0]["flops_per_step"]  # a third stream costs FLOPs
    assert {r["method"] for r in results["seed_methods"]} == {"iv_tuning", "cola"}
    assert all(results[section] for section in SECTIONS)
    assert results["scoring"][0]["scoring_over_forward"] > 1  # four masked passes cost more than one forward
    assert results["loader"][0]["loader_images_per_second"] > 0
    levers = {row["lever"]: row for row in results["levers"]}
    assert list(levers) == ["channels_last", "activation_checkpointing", "compile"]
    for name, row in levers.items():
        assert row[f"{name}_over_plain"] == pytest.approx(row[f"{name}_ms"] / row["plain_ms"], rel=1e-2)
        assert row["first_step_seconds"] >= 0
    assert levers["compile"]["backend"] == "eager"  # dynamo traces the blocks; no code generation on a CPU test
    assert len({row["flops_per_step"] for row in levers.values()}) == 1  # model FLOPs: the plain step's work


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine this would run the whole suite")
def test_the_real_scale_suite_refuses_a_cpu(tmp_path, monkeypatch, capsys):
    """Hiera-L at 1024 px on a CPU would run for hours: the suite says to use --tiny instead."""
    with pytest.raises(SystemExit) as stopped:
        run_suite(monkeypatch, "--out", str(tmp_path / "x.json"))
    assert stopped.value.code != 0 and "--tiny" in capsys.readouterr().err and not (tmp_path / "x.json").exists()


def test_largest_batch_finds_the_limit_by_doubling_and_bisection():
    tried = []

    def fits(batch: int) -> bool:
        tried.append(batch)
        return batch <= 37

    assert largest_batch(fits, limit=256, precision=0.0) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]  # doubling until the first failure, then bisection
    assert len(tried) <= 7 + 6
    assert largest_batch(lambda b: b <= 300, limit=256) == 256  # capped by the search limit
    assert largest_batch(lambda b: False, limit=256) == 0


def test_flops_are_counted_by_torch_and_timing_alternates():
    """A linear layer's forward is 2*B*in*out FLOPs and its backward twice that (torch's counter)."""
    layer = torch.nn.Linear(64, 32)
    x = torch.randn(8, 64, requires_grad=True)
    assert count_flops(lambda: layer(x), torch.device("cpu")) == 2 * 8 * 64 * 32
    assert count_flops(lambda: layer(x).sum().backward(), torch.device("cpu")) == 3 * 2 * 8 * 64 * 32
    order = []
    times = time_side_by_side({"a": lambda: order.append("a"), "b": lambda: order.append("b")},
                              torch.device("cpu"), repeats=3, warmup=1)
    assert order == ["a", "b"] * 4 and set(times) == {"a", "b"}
