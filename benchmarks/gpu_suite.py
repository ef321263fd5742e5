"""One-shot GPU suite: every step benchmark at the real scale, in one unattended call, into one JSON.

    python benchmarks/gpu_suite.py --out gpu_suite.json              # any machine with a GPU
    python benchmarks/gpu_suite.py --tiny --out /tmp/tiny.json       # the same code path on a CPU

No downloads: every encoder is randomly initialised (the JSON says so); FLOPs and speed do not
depend on the weights. Per configuration (Hiera-B+ and Hiera-L, 512 and 1024 px, two and three
streams, bf16 autocast as the trainer's `bf16-mixed`), the Stage-2 tp_mome step is timed against
its floor (the plain frozen encoder's forward + backward per stream, `pipeline.benchmarking`),
with images/s, FLOPs per step counted by `torch.utils.flop_counter`, model FLOP utilisation
against the device's dense bf16 peak and peak memory. Then the seed methods' steps, the PSST joint
step, subset scoring and evaluation (against the plain forward), whether each lever pays on this
device (the tp_mome step with `torch.compile`, channels-last or activation checkpointing against
the same step without it, with the first step's time, compilation included, and each one's peak
memory), where the MSRS pairs are found (`--data`) the loaders against what the Stage-2 step
consumes, and last, per configuration, the largest batch that fits with and without activation
checkpointing (the longest part).

Everything runs under a time budget (`--budget`, default 7 minutes of the 8 allowed): sections
run in order of importance, the JSON is rewritten after every measurement, and what the budget
did not reach is listed under `skipped`. A measurement that fails is recorded under `errors` and
the suite goes on.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.benchmarking import (
    LEVERS,
    Stage2Setup,
    count_flops,
    device_name,
    encoder_floor_step,
    encoder_forward,
    fits_in_memory,
    is_out_of_memory,
    largest_batch,
    lever_pair,
    loader_images_per_second,
    multicrop_batch,
    peak_flops,
    peak_memory_bytes,
    psst_joint_floor_step,
    psst_joint_module,
    psst_joint_step,
    release_memory,
    rgbt_encoders,
    shard_msrs_pairs,
    stage2_setup,
    stage2_step,
    subset_scores,
    task_training_loader,
    time_call,
    time_side_by_side,
)

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrs_rgbt_det"
MODALITIES = ("thermal", "depth")


class BudgetSpent(RuntimeError):
    """The suite's time budget ran out inside a measurement."""


class Suite:
    """The run's settings, its results so far, and its clock."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args, self.device = args, device
        self.bf16 = device.type == "cuda"
        self.started = time.monotonic()
        tiny = args.tiny
        self.backbones = [{"name": "sam2_hiera_tiny", "embed_dim": 16}] if tiny else \
            [{"name": "sam2_hiera_base_plus"}, {"name": "sam2_hiera_large"}]
        self.sizes = [64] if tiny else [512, 1024]
        self.stream_counts = [2, 3]
        self.repeats = 1 if tiny else args.repeats
        self.max_batch = 2 if tiny else args.max_batch
        self.compile_backend = "eager" if tiny else args.compile_backend  # tiny: dynamo's tracing, no codegen
        self.results: dict[str, Any] = {
            "suite": "xmodal GPU suite (benchmarks/gpu_suite.py)",
            "device": device_name(device),
            "device_peak_bf16_flops": peak_flops(device),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "tiny": tiny, "weights": "random initialisation (no downloads): speed and memory only",
            "precision": "bf16 autocast (bf16-mixed)" if self.bf16 else "fp32",
            "budget_seconds": args.budget,
            "stage2": [], "largest_batch": [], "seed_methods": [], "psst_joint": [], "scoring": [], "evaluation": [],
            "levers": [], "loader": [],
            "skipped": [], "errors": [],
        }

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget

    def batch_for(self, size: int) -> int:
        """The measurement batch: 8 images at 512 px (2 at 1024 px), i.e. a fixed pixel count."""
        return 2 if self.args.tiny else max(1, 8 * 512**2 // size**2)

    def run(self, section: str, what: dict[str, Any], measure: Callable[[], dict[str, Any]]) -> None:
        """`measure()` into `results[section]` (with `what` it measured), unless the budget is spent."""
        if self.over_budget():
            self.results["skipped"].append({"section": section, **what, "reason": "time budget spent"})
        else:
            try:
                self.results[section].append({**what, **measure()})
            except BudgetSpent as err:
                self.results["skipped"].append({"section": section, **what, "reason": str(err)})
            except Exception as err:  # unattended: record it, go on with the next measurement
                self.results["errors"].append({"section": section, **what, "error": f"{type(err).__name__}: {err}",
                                               "traceback": traceback.format_exc(limit=4)})
            finally:
                release_memory(self.device)
        self.write()

    def write(self) -> None:
        self.results["elapsed_seconds"] = round(self.elapsed(), 1)
        out = Path(self.args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(self.results, indent=2) + "\n")
        os.replace(tmp, out)

    def speed(self, steps: dict[str, Callable[[], Any]], measured: str, images: int,
              model_flops: Callable[[], Any] | None = None) -> dict[str, Any]:
        """Side-by-side times of `steps` (the first is the floor), and for `measured`: images/s,
        FLOPs, utilisation and peak memory. FLOPs are counted on `model_flops` where given (the
        same work done without a lever: recomputation is not model work, and FLOPs are counted
        in eager mode, not through compiled code)."""
        times = time_side_by_side(steps, self.device, repeats=self.repeats, bf16=self.bf16)
        floor_name = next(iter(steps))
        flops = count_flops(model_flops or steps[measured], self.device, self.bf16)
        peak = peak_memory_bytes(steps[measured], self.device, self.bf16)
        device_peak = self.results["device_peak_bf16_flops"]
        result = {f"{name}_ms": round(seconds * 1000, 2) for name, seconds in times.items()}
        result.update({
            f"{measured}_over_{floor_name}": round(times[measured] / times[floor_name], 3),
            "images_per_second": round(images / times[measured], 2),
            "flops_per_step": flops,
            "achieved_tflops": round(flops / times[measured] / 1e12, 2),
            "mfu": round(flops / times[measured] / device_peak, 4) if device_peak else None,
            "peak_memory_gib": round(peak / 2**30, 3) if peak is not None else None,
        })
        return result


def step_against_floor(suite: Suite, setup: Stage2Setup, batch_size: int, size: int) -> dict[str, Any]:
    """The Stage-2 step vs its floor on one random batch (freed on return)."""
    batch = setup.batch(batch_size, size)
    return suite.speed({"floor": lambda: encoder_floor_step(setup, batch),
                        "step": lambda: stage2_step(setup, batch)}, "step", batch_size)


def stage2_config(suite: Suite, backbone: dict[str, Any], size: int, streams: list[str]) -> dict[str, Any]:
    """tp_mome's step vs floor at the measurement batch."""
    batch_size = suite.batch_for(size)
    with stage2_setup(backbone, streams, "tp_mome", suite.device) as setup:
        try:
            return {"batch": batch_size, **step_against_floor(suite, setup, batch_size, size)}
        except RuntimeError as err:
            if not is_out_of_memory(err):
                raise
            return {"batch": batch_size, "out_of_memory": True}


def stage2_largest_batch(suite: Suite, backbone: dict[str, Any], size: int, streams: list[str]) -> dict[str, Any]:
    """The largest tp_mome training batch that fits, without and with activation checkpointing of
    every stage (the search stops with BudgetSpent when the suite's time is up)."""
    with stage2_setup(backbone, streams, "tp_mome", suite.device) as setup:
        def fits(batch_size: int) -> bool:
            if suite.over_budget():
                raise BudgetSpent(f"time budget spent while trying batch {batch_size}")
            return fits_in_memory(lambda: stage2_step(setup, setup.batch(batch_size, size)), suite.device,
                                  suite.bf16, cleanup=setup.release)

        largest = {}
        for name, stages in (("plain", False), ("activation_checkpointing", True)):
            setup.model.backbone.set_activation_checkpointing(stages)
            largest[name] = largest_batch(fits, limit=suite.max_batch, precision=0.25)
        return {**largest, "search_limit": suite.max_batch, "precision": "within 25% below the true limit"}


def seed_method(suite: Suite, method: str, backbone: dict[str, Any], size: int) -> dict[str, Any]:
    batch_size = suite.batch_for(size)
    with stage2_setup(backbone, ["rgb", "thermal"], method, suite.device) as setup:
        return {"batch": batch_size, **step_against_floor(suite, setup, batch_size, size)}


def psst_joint(suite: Suite, backbone: dict[str, Any], size: int) -> dict[str, Any]:
    batch_size = suite.batch_for(size)
    module = psst_joint_module(backbone, suite.device)
    batch = multicrop_batch(batch_size, size, 2, suite.device)
    return {"batch": batch_size, "crops": f"2 x {size}px + 2 x {size // 2}px",
            **suite.speed({"floor": lambda: psst_joint_floor_step(module, batch),
                           "step": lambda: psst_joint_step(module, batch)}, "step", batch_size)}


def scoring(suite: Suite, backbone: dict[str, Any], size: int, masks: int = 4) -> dict[str, Any]:
    batch_size = suite.batch_for(size)
    network = psst_joint_module(backbone, suite.device).network.eval()
    images = torch.randn(batch_size, 3, size, size, device=suite.device)
    keys = [f"image{i}" for i in range(batch_size)]
    result = suite.speed({"forward": lambda: encoder_forward(network.backbone, images),
                          "scoring": lambda: subset_scores(network, keys, images, masks)}, "scoring", batch_size)
    return {"batch": batch_size, "masks": masks, "scoring_over_forward_per_mask":
            round(result["scoring_over_forward"] / masks, 3), **result}


def evaluation(suite: Suite, backbone: dict[str, Any], size: int) -> dict[str, Any]:
    """The task model's inference (tp_mome RGB+T, detection head, post-processing) vs the plain
    encoder forward of both streams."""
    batch_size = suite.batch_for(size)
    decoder = {"architecture": "fcos", "fpn_channels": 256, "strides": [8, 16, 32]}
    with stage2_setup(backbone, ["rgb", "thermal"], "tp_mome", suite.device, head="detection", num_classes=3,
                      decoder=decoder) as setup:
        model, floor = setup.model.eval(), setup.floor_encoder.eval()
        inputs = {s: torch.randn(batch_size, 3, size, size, device=suite.device) for s in setup.streams}

        @torch.no_grad()
        def predict() -> None:
            model(inputs).detections()

        return {"batch": batch_size, **suite.speed(
            {"forward": lambda: [encoder_forward(floor, x) for x in inputs.values()], "model": predict},
            "model", batch_size)}


def measure_lever(suite: Suite, name: str, backbone: dict[str, Any], size: int) -> dict[str, Any]:
    """The tp_mome step (RGB + thermal) with lever `name` against the same step without it, each on
    its own copy of the model, side by side; `first_step_seconds` includes compilation. Both
    copies stay resident, so each peak includes the other's weights (the same for both peaks:
    their difference is the lever's saving)."""
    batch_size = suite.batch_for(size)
    streams = ["rgb", "thermal"]
    with lever_pair(backbone, streams, "tp_mome", suite.device, name, suite.compile_backend) as (plain, levered):
        batch = plain.batch(batch_size, size)
        first_step = time_call(lambda: stage2_step(levered, batch), suite.device, suite.bf16)
        plain_peak = peak_memory_bytes(lambda: stage2_step(plain, batch), suite.device, suite.bf16)
        result = suite.speed({"plain": lambda: stage2_step(plain, batch), name: lambda: stage2_step(levered, batch)},
                             name, batch_size, model_flops=lambda: stage2_step(plain, batch))
    return {"batch": batch_size, "streams": streams, "first_step_seconds": round(first_step, 1),
            "plain_peak_memory_gib": round(plain_peak / 2**30, 3) if plain_peak is not None else None,
            **({"backend": suite.compile_backend} if name == "compile" else {}), **result}


def loaders(suite: Suite, data: Path, workers: int, size: int) -> dict[str, Any]:
    """Stage-2 training loader (real MSRS pairs, paired crops at `size`) images/s in `workers`
    processes vs the B+ tp_mome step's consumption."""
    batch_size, batches = suite.batch_for(size), 4 if suite.args.tiny else 20
    with tempfile.TemporaryDirectory(prefix="xmodal-suite-") as tmp:
        shard_msrs_pairs(data, tmp, {"train": 1.0}, workers=min(8, os.cpu_count() or 1))
        urls, _, encoders = rgbt_encoders(Path(tmp), "train")
        loaded = loader_images_per_second(task_training_loader(
            encoders, urls, size=[size, size], batch_size=batch_size, batches=batches, workers=workers),
            batch_size, batches)
    with stage2_setup(suite.backbones[0], ["rgb", "thermal"], "tp_mome", suite.device) as setup:
        batch = setup.batch(batch_size, size)
        step = time_side_by_side({"step": lambda: stage2_step(setup, batch)}, suite.device, repeats=suite.repeats,
                                 bf16=suite.bf16)["step"]
    consumed = batch_size / step
    return {"batch": batch_size, "workers": workers, "loader_images_per_second": round(loaded, 2),
            "step_images_per_second": round(consumed, 2), "loader_over_consumption": round(loaded / consumed, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_suite.json")
    parser.add_argument("--tiny", action="store_true", help="tiny encoder and images: the plumbing, on any device")
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later measurements are skipped after it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=128, help="upper end of the largest-batch search")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="MSRS pairs for the loader measurement")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader processes")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compile lever")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)  # the random-weights warning: the JSON records it once
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 leftovers outside autocast, as a trainer would run
        torch.backends.cudnn.allow_tf32 = True
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.tiny:
        parser.error("no GPU here: run with --tiny for the CPU check of the suite's plumbing")
    suite = Suite(args, device)
    suite.write()

    small, large = suite.backbones[0], suite.backbones[-1]
    size = suite.sizes[0]
    configs = [(backbone, image_size, ["rgb", *MODALITIES[: count - 1]]) for backbone in suite.backbones
               for image_size in suite.sizes for count in suite.stream_counts]
    for backbone, image_size, streams in configs:  # the headline table first
        suite.run("stage2", {"backbone": backbone["name"], "image_size": image_size, "streams": streams,
                             "method": "tp_mome"},
                  lambda b=backbone, s=image_size, st=streams: stage2_config(suite, b, s, st))
    for method in ("iv_tuning", "cola"):
        suite.run("seed_methods", {"backbone": small["name"], "image_size": size, "method": method},
                  lambda m=method: seed_method(suite, m, small, size))
    for backbone in [small] if small is large else [small, large]:
        suite.run("psst_joint", {"backbone": backbone["name"], "image_size": size},
                  lambda b=backbone: psst_joint(suite, b, size))
    suite.run("scoring", {"backbone": small["name"], "image_size": size}, lambda: scoring(suite, small, size))
    suite.run("evaluation", {"backbone": small["name"], "image_size": size}, lambda: evaluation(suite, small, size))
    for name in LEVERS:  # compile last: it compiles before its first step
        suite.run("levers", {"lever": name, "backbone": small["name"], "image_size": size, "method": "tp_mome"},
                  lambda n=name: measure_lever(suite, n, small, size))
    if args.data.is_dir():
        suite.run("loader", {"backbone": small["name"], "image_size": size, "data": str(args.data)},
                  lambda: loaders(suite, args.data, args.workers, size))
    else:
        suite.results["skipped"].append({"section": "loader", "reason": f"no MSRS pairs at {args.data} (--data)"})
    for backbone, image_size, streams in configs:  # the batch searches last: the longest part
        suite.run("largest_batch", {"backbone": backbone["name"], "image_size": image_size, "streams": streams,
                                    "method": "tp_mome"},
                  lambda b=backbone, s=image_size, st=streams: stage2_largest_batch(suite, b, s, st))
    suite.write()
    print(f"{suite.results['device']}: {len(suite.results['errors'])} errors, {len(suite.results['skipped'])} "
          f"skipped, {suite.elapsed():.0f} s; results in {args.out}")


if __name__ == "__main__":
    main()
