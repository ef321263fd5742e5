"""One PSST joint-phase training step against its floor, measured side by side in one run.

    python benchmarks/psst_step.py                       # CPU: Hiera-T, 128 px, batch 4
    python benchmarks/psst_step.py --backbone sam2_hiera_base_plus --image-size 512 --batch 8

The floor is the work the joint phase cannot avoid: the student's forward + backward through
the frozen encoder with plain LoRA on the same crops (globals and locals), plus the teacher's
forward on the global crops, with no mask token, decoder, heads, losses or EMA. Our step is
`JointTraining.training_step` + backward + the EMA update. Both run on the same batch and are
timed alternately; the ratio says what PSST's extra work costs. On a GPU the step runs in bf16
autocast, and images/s and peak memory are printed too.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from pipeline.methods.psst import HeadSettings, PSSTNetwork
from pipeline.models.backbone import create_backbone
from pipeline.models.lora import LoraSettings
from pipeline.training.optim import OptimSettings
from pipeline.training.psst_module import JointSettings, JointTraining


def build(args: argparse.Namespace, device: torch.device) -> JointTraining:
    backbone = create_backbone(args.backbone, weights="random")
    network = PSSTNetwork(backbone, LoraSettings(rank=args.rank), decoder_dim=128, head=HeadSettings(512, 128, 4096))
    module = JointTraining(network, joint=JointSettings(), total_steps=1000, optim=OptimSettings(),
                           mask_ratio=0.6, normalize_targets=True, seed=0)
    return module.to(device).train()


def floor_step(module: JointTraining, batch: dict) -> None:
    """Student fwd+bwd on every crop and teacher fwd on the globals, plain LoRA encoder only."""
    backbone = module.network.backbone
    with torch.no_grad():
        backbone(batch["global"].flatten(0, 1))
    loss = sum(f.float().mean() for f in backbone(batch["global"].flatten(0, 1)))
    loss = loss + sum(f.float().mean() for f in backbone(batch["local"].flatten(0, 1)))
    loss.backward()


def psst_step(module: JointTraining, batch: dict) -> None:
    module.training_step(batch, 0).backward()
    module.teacher.update(module.network, 0.996)


def timed(step, module: JointTraining, batch: dict, device: torch.device, dtype: torch.dtype | None) -> float:
    module.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        step(module, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="sam2_hiera_tiny")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else None
    module = build(args, device)
    size, local = args.image_size, args.image_size // 2
    batch = {"global": torch.randn(args.batch, 2, 3, size, size, device=device),
             "local": torch.randn(args.batch, args.local_crops, 3, local, local, device=device)}

    for step in (floor_step, psst_step):  # warm-up (allocator, kernels, lazy init)
        timed(step, module, batch, device, dtype)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    floors, ours = [], []
    for _ in range(args.repeats):  # alternate, so drift in machine load hits both alike
        floors.append(timed(floor_step, module, batch, device, dtype))
        ours.append(timed(psst_step, module, batch, device, dtype))
    floor, step = statistics.median(floors), statistics.median(ours)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {args.backbone} (random weights), {size}px globals x2, "
          f"{local}px locals x{args.local_crops}, batch {args.batch}, {'bf16 autocast' if dtype else 'fp32'}")
    print(f"floor (plain LoRA student fwd+bwd + teacher fwd): {floor * 1000:8.1f} ms/step")
    print(f"PSST joint step (masking, decoder, heads, losses, EMA): {step * 1000:8.1f} ms/step")
    print(f"ratio PSST/floor: {step / floor:.2f}")
    if device.type == "cuda":
        print(f"images/s (samples of 2 globals + {args.local_crops} locals): {args.batch / step:.1f}; "
              f"peak memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
