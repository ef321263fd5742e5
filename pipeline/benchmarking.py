"""Measuring training and inference steps against their floors (benchmarks/ and the GPU suite).

A benchmark here never reports a time alone: it times *our* step and its *floor* (the work
that step cannot avoid, e.g. the plain frozen encoder's forward + backward on the same batch)
side by side, alternating, in one process, and reports the ratio. Absolute numbers come only
with the device they ran on (`device_name`).

Pieces every benchmark shares:

* `time_side_by_side`: warm-up, then alternate the steps so drift in machine load hits them alike;
  CUDA is synchronised around every step, and each step may run under bf16 autocast.
* `count_flops`: FLOPs of one call, counted by `torch.utils.flop_counter` (matmuls, convolutions,
  attention; forward and backward), for model FLOP utilisation against `peak_flops`.
* `largest_batch`: the largest batch that fits (doubling, then bisection, on out-of-memory).
* `stage2_setup`: a Stage-2 task model of any method at any scale on a randomly initialised
  encoder, with identity modality LoRAs exported and loaded through the real artifact path (a
  LoRA's cost does not depend on its values), and `stage2_step` / `encoder_floor_step`.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from itertools import islice
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

from pipeline.config import compose_params
from pipeline.data.loading import shard_keys, shard_urls
from pipeline.data.readers import build_reader
from pipeline.data.sharding import read_manifest, shard_dataset
from pipeline.data.types import RGB
from pipeline.methods.psst import HeadSettings, PSSTNetwork, mask_grid, reconstruction_scores
from pipeline.methods.stage2 import MethodSettings, TaskModel
from pipeline.models.backbone import Backbone, create_backbone
from pipeline.models.lora import LoraSettings, add_lora, export_lora, lora_provenance
from pipeline.models.masking import scoring_masks
from pipeline.models.task_losses import segmentation_loss
from pipeline.training.optim import OptimSettings, configure_optimizer
from pipeline.training.psst_data import EncodeImage
from pipeline.training.psst_module import JointSettings, JointTraining
from pipeline.training.task_data import stream_encoders, task_loader
from pipeline.training.tasks import training_stream
from pipeline.training.trainer import ChannelsLast

# Dense bf16 tensor-core peak of known accelerators (vendor data sheets, no sparsity), matched by
# substring of `torch.cuda.get_device_name`; MFU is left out on devices not listed.
PEAK_BF16_FLOPS = {
    "B200": 2250e12,
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
    "L40S": 362e12,
    "L40": 181e12,
    "A10G": 70e12,
    "L4": 121e12,
    "RTX 4090": 165e12,
}


def device_name(device: torch.device) -> str:
    """What an absolute number ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak (FLOP/s), or None where unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def benchmark_device() -> tuple[torch.device, bool]:
    """The GPU when there is one, under bf16 autocast as the GPU trainers run (else the CPU in
    fp32); warnings and the random-weights log are silenced, since a benchmark's header says once
    that its weights are random."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, device.type == "cuda"


def add_encoder_arguments(parser: argparse.ArgumentParser, embed_dim: int = 48) -> None:
    """--backbone and --embed-dim: a timm Hiera, by default the demo's narrow Hiera-T."""
    parser.add_argument("--backbone", default="sam2_hiera_tiny")
    parser.add_argument("--embed-dim", type=int, default=embed_dim,
                        help="a narrower Hiera (the demo's is 48); 0: timm's own width")


def encoder_from_arguments(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    """create_backbone's keywords from `add_encoder_arguments`, and their description."""
    narrow = {"embed_dim": args.embed_dim} if args.embed_dim else {}
    return {"name": args.backbone, **narrow}, f"{args.backbone}{f' (embed_dim {args.embed_dim})' if narrow else ''}"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast as Lightning's `bf16-mixed` runs it (fp32 weights), or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()


def time_call(step: Callable[[], Any], device: torch.device, bf16: bool = False) -> float:
    """Seconds of one call of `step`, the device synchronised before and after."""
    synchronize(device)
    start = time.perf_counter()
    with autocast(device, bf16):
        step()
    synchronize(device)
    return time.perf_counter() - start


def time_side_by_side(steps: Mapping[str, Callable[[], Any]], device: torch.device, *, repeats: int,
                      warmup: int = 1, bf16: bool = False) -> dict[str, float]:
    """Median seconds per call of each step, timed alternately after `warmup` calls of each."""
    for _ in range(warmup):  # allocator, kernels, lazy initialisation, compilation
        for step in steps.values():
            time_call(step, device, bf16)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(time_call(step, device, bf16))
    return {name: statistics.median(values) for name, values in times.items()}


def count_flops(step: Callable[[], Any], device: torch.device, bf16: bool = False) -> int:
    """FLOPs of one call of `step` (forward and, if it runs one, backward), by torch's counter."""
    counter = FlopCounterMode(display=False)
    with counter, autocast(device, bf16):
        step()
    return counter.get_total_flops()


def peak_memory_bytes(step: Callable[[], Any], device: torch.device, bf16: bool = False) -> int | None:
    """Peak CUDA memory allocated during one call of `step` (None off CUDA)."""
    if device.type != "cuda":
        return None
    release_memory(device)
    torch.cuda.reset_peak_memory_stats(device)
    with autocast(device, bf16):
        step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def largest_batch(fits: Callable[[int], bool], *, limit: int, precision: float = 0.125) -> int:
    """The largest batch b <= `limit` with `fits(b)` (0 if not even 1 fits), to within
    `precision` of itself: doubling from 1, then bisection between the last fit and the first
    failure. `fits` must free what a failed try allocated (see `fits_in_memory`)."""
    if not fits(1):
        return 0
    good = 1
    while good * 2 <= limit and fits(good * 2):
        good *= 2
    bad = min(good * 2, limit + 1)
    while bad - good > max(1, int(good * precision)):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def fits_in_memory(step: Callable[[], Any], device: torch.device, bf16: bool = False,
                   cleanup: Callable[[], None] = lambda: None) -> bool:
    """Whether one call of `step` runs without running out of device memory."""
    try:
        with autocast(device, bf16):
            step()
        synchronize(device)
        return True
    except RuntimeError as err:  # torch.OutOfMemoryError is one
        if not is_out_of_memory(err):
            raise
        return False
    finally:
        cleanup()
        release_memory(device)


@functools.cache
def default_params() -> dict[str, Any]:
    """The default composition of conf/ (methods, modalities), composed once per process."""
    return yaml.safe_load(compose_params([]))


def identity_lora_dirs(backbone_args: Mapping[str, Any], streams: Sequence[str], root: Path,
                       settings: LoraSettings = LoraSettings()) -> dict[str, Path]:
    """One modality LoRA artifact per non-RGB stream, with B = 0 (the identity), for a randomly
    initialised encoder: a benchmark's stand-in for PSST's output that costs the same to run."""
    backbone = create_backbone(**backbone_args, weights="random")
    peft = add_lora(backbone, settings)
    dirs = {}
    for stream in streams:
        if stream != RGB:
            provenance = lora_provenance(backbone, settings, peft, modality={"name": stream},
                                         psst={"mode": "none", "note": "identity LoRA for benchmarks"})
            dirs[stream] = export_lora(peft, root / stream, provenance)
    return dirs


@dataclass
class Stage2Setup:
    """A task model, its optimiser over what trains, and a plain encoder for the floor."""

    model: TaskModel
    optimizer: torch.optim.Optimizer
    floor_encoder: Backbone
    streams: list[str]
    num_classes: int
    device: torch.device

    def batch(self, batch_size: int, size: int | Sequence[int]) -> dict[str, Tensor]:
        """Random images per stream and a segmentation target, on the device."""
        h, w = (size, size) if isinstance(size, int) else size
        batch = {s: torch.randn(batch_size, 3, h, w, device=self.device) for s in self.streams}
        batch["target"] = torch.randint(0, self.num_classes, (batch_size, h, w), device=self.device)
        return batch

    def release(self) -> None:
        """Drop gradients (after an out-of-memory try, or between configurations)."""
        self.model.zero_grad(set_to_none=True)
        self.floor_encoder.zero_grad(set_to_none=True)


def shard_msrs_pairs(root: Path | str, out_dir: Path | str, splits: Mapping[str, float], workers: int = 2) -> None:
    """Shard the real MSRS RGB-thermal pairs (with boxes) under `root` for a benchmark."""
    reader = build_reader({"reader": "msrs_det", "root": str(root), "splits": dict(splits)})
    shard_dataset(reader, Path(out_dir), name="msrs", min_shards_per_split=2, workers=workers, progress=False)


def rgbt_encoders(shard_dir: Path, split: str) -> tuple[list[str], dict[str, Any], dict[str, EncodeImage]]:
    """(shard urls, manifest, RGB + thermal encoders) of a sharded split, encoded as a task would
    (the default thermal encoding; its mean/std measured on 32 images)."""
    urls, manifest = shard_urls(shard_dir, split), read_manifest(shard_dir)
    rgb_stats = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)  # what timm's Hiera configs normalise RGB with
    encoders = stream_encoders([RGB, "thermal"], default_params()["modalities"], manifest, urls, rgb_stats, 32,
                               progress=False)
    return urls, manifest, encoders


def untimed_batches(workers: int) -> int:
    """Batches a loader has ready before its steady state: the first, plus what its workers
    prefetched while it started (DataLoader's default prefetch_factor, 2 per worker)."""
    return 1 + 2 * workers


def task_training_loader(encoders: Mapping[str, EncodeImage], urls: Sequence[str], *, size: Sequence[int],
                         batch_size: int, batches: int, workers: int) -> DataLoader:
    """The Stage-2 training loader (paired crops at `size`, detection targets) with `batches`
    batches past the untimed ones."""
    samples = batch_size * (batches + untimed_batches(workers))
    train = {"image_size": list(size), "crop_scale": [0.5, 1.0], "samples_per_epoch": samples}
    stream = training_stream(encoders, urls, shard_keys(urls), train, head="detection", foreground=[], seed=0)
    return task_loader(stream, batch_size, workers)


def loader_images_per_second(loader: DataLoader, batch_size: int, count: int) -> float:
    """Images/s of `count` batches after the untimed ones: worker start-up and the batches
    prefetched meanwhile would count work done before the clock started."""
    iterator = iter(loader)
    for _ in range(untimed_batches(loader.num_workers)):
        next(iterator)
    start = time.perf_counter()
    done = sum(1 for _ in islice(iterator, count))
    return done * batch_size / (time.perf_counter() - start)


@contextmanager
def stage2_setup(backbone_args: Mapping[str, Any], streams: Sequence[str], method: str, device: torch.device, *,
                 head: str = "segmentation", num_classes: int = 9,
                 decoder: Mapping[str, Any] | None = None) -> Iterator[Stage2Setup]:
    """A Stage-2 task model of `method` (conf/method/<method>.yaml) with a `head` decoder on a randomly initialised encoder built from `backbone_args`
    (create_backbone's keywords), with identity modality LoRAs where the method loads them, in
    train mode on `device`; `decoder` holds the head's options."""
    import tempfile

    settings = MethodSettings.from_config(default_params()["methods"][method])
    with tempfile.TemporaryDirectory(prefix="xmodal-bench-") as tmp:
        lora_dirs = identity_lora_dirs(backbone_args, streams, Path(tmp)) if settings.modality_loras else {}
        backbone = create_backbone(**backbone_args, weights="random")
        model = TaskModel(backbone, list(streams), settings, head=head, num_classes=num_classes,
                          decoder=dict(decoder or {}), lora_dirs=lora_dirs).to(device).train()
        floor = create_backbone(**backbone_args, weights="random").requires_grad_(False).to(device).train()
        optimizer = configure_optimizer(model, OptimSettings(), total_steps=1000)["optimizer"]  # as the trainer
        yield Stage2Setup(model, optimizer, floor, list(streams), num_classes, device)


LEVERS = ("channels_last", "activation_checkpointing", "compile")


def apply_lever(setup: Stage2Setup, lever: str, compile_backend: str = "inductor") -> None:
    """Turn one `memory.*` lever on in a setup's task model, as the trainer does."""
    if lever == "compile":
        setup.model.backbone.set_compile(compile_backend)
    elif lever == "channels_last":
        ChannelsLast().setup(None, setup.model, "fit")
    elif lever == "activation_checkpointing":
        setup.model.backbone.set_activation_checkpointing(True)
    else:
        raise ValueError(f"unknown lever {lever!r}; one of {', '.join(LEVERS)}")


@contextmanager
def lever_pair(backbone_args: Mapping[str, Any], streams: Sequence[str], method: str, device: torch.device,
               lever: str, compile_backend: str = "inductor",
               **setup_args: Any) -> Iterator[tuple[Stage2Setup, Stage2Setup]]:
    """Two copies of one Stage-2 setup (`stage2_setup`), the second with `lever` on: whether a
    lever pays is its step against the plain one, side by side."""
    with stage2_setup(backbone_args, streams, method, device, **setup_args) as plain, \
            stage2_setup(backbone_args, streams, method, device, **setup_args) as levered:
        apply_lever(levered, lever, compile_backend)
        yield plain, levered


def stage2_step(setup: Stage2Setup, batch: Mapping[str, Tensor]) -> None:
    """One Stage-2 optimiser step: every stream's encoder pass, fusion, decoder, the task loss,
    backward and AdamW (what `TaskTraining` does per batch, without Lightning's bookkeeping)."""
    logits = setup.model({s: batch[s] for s in setup.streams})
    loss = segmentation_loss(logits.float(), batch["target"])
    loss.backward()
    setup.optimizer.step()
    setup.optimizer.zero_grad(set_to_none=True)


def encoder_floor_step(setup: Stage2Setup, batch: Mapping[str, Tensor]) -> None:
    """The floor of a Stage-2 step: the plain frozen encoder's forward and backward, once per
    stream, on the same images (no prompts, adapters, fusion or decoder). The backward reaches
    every block (the inputs require gradients), as prompts and adapters inside the encoder need."""
    loss = sum(f.float().mean() for s in setup.streams
               for f in setup.floor_encoder(batch[s].detach().requires_grad_()))
    loss.backward()


def method_encoder_step(setup: Stage2Setup, batch: Mapping[str, Tensor]) -> None:
    """The method's encoder passes alone (with its prompts, LoRAs or adapters), forward and
    backward, without fusion, decoder or optimiser: what separates the encoder's share of a
    step's overhead from the head's."""
    model = setup.model
    with torch.set_grad_enabled(model.method.encoder_trains):
        features = model.features({s: batch[s] for s in setup.streams})
    loss = sum(f.float().mean() for maps in features.values() for f in maps)
    if loss.requires_grad:
        loss.backward()
    model.zero_grad(set_to_none=True)


@torch.no_grad()
def encoder_forward(encoder: Backbone, images: Tensor) -> list[Tensor]:
    """The plain encoder forward (the floor of scoring and evaluation)."""
    return encoder(images)


def psst_joint_module(backbone_args: Mapping[str, Any], device: torch.device, *, rank: int = 32,
                      decoder_dim: int = 128, head: Sequence[int] = (512, 128, 4096)) -> JointTraining:
    """PSST's joint-phase module (student with LoRA, MAE decoder, DINO head, EMA teacher) on a
    randomly initialised encoder, in train mode on `device`."""
    backbone = create_backbone(**backbone_args, weights="random")
    network = PSSTNetwork(backbone, LoraSettings(rank=rank), decoder_dim=decoder_dim, head=HeadSettings(*head))
    module = JointTraining(network, joint=JointSettings(), total_steps=1000, optim=OptimSettings(),
                           mask_ratio=0.6, normalize_targets=True, seed=0)
    return module.to(device).train()


def multicrop_batch(batch_size: int, size: int, local_crops: int, device: torch.device) -> dict[str, Any]:
    """Random joint-phase views: 2 global crops of `size` and `local_crops` of half the size."""
    return {"key": [f"image{i}" for i in range(batch_size)],
            "global": torch.randn(batch_size, 2, 3, size, size, device=device),
            "local": torch.randn(batch_size, local_crops, 3, size // 2, size // 2, device=device)}


def psst_joint_step(module: JointTraining, batch: Mapping[str, Any]) -> None:
    """One joint-phase step: teacher, masked student, decoder, heads, losses, backward, EMA update."""
    module.training_step(dict(batch), 0).backward()
    module.teacher.update(module.network, 0.996)
    module.zero_grad(set_to_none=True)


def psst_joint_floor_step(module: JointTraining, batch: Mapping[str, Any]) -> None:
    """The floor of a joint step: the student's forward + backward through the encoder with plain
    LoRA on every crop, plus the teacher's forward on the global crops (no mask token, decoder,
    heads, losses or EMA)."""
    backbone = module.network.backbone
    with torch.no_grad():
        backbone(batch["global"].flatten(0, 1))
    loss = sum(f.float().mean() for f in backbone(batch["global"].flatten(0, 1)))
    loss = loss + sum(f.float().mean() for f in backbone(batch["local"].flatten(0, 1)))
    loss.backward()
    module.zero_grad(set_to_none=True)


@torch.no_grad()
def subset_scores(network: PSSTNetwork, keys: Sequence[str], images: Tensor, num_masks: int) -> Tensor:
    """Subset selection's scores of a batch, as `run_select` computes them (keyed masks)."""
    grid = mask_grid(images.shape[-2:])
    masks = scoring_masks(keys, grid, 0.6, 0, num_masks, images.device)
    return reconstruction_scores(network, images, masks)
