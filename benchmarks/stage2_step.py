"""One Stage-2 training step of each seed method and ours against its floor, side by side in one run.

    python benchmarks/stage2_step.py                     # CPU: narrow Hiera-T, 128 px, batch 4
    python benchmarks/stage2_step.py --backbone sam2_hiera_base_plus --embed-dim 0 --image-size 512 --batch 8

The floor is what a Stage-2 step cannot avoid: the plain frozen encoder's forward + backward
once per stream on the same batch (the backward reaches every block, as prompts and adapters
inside the encoder need), with no prompts, LoRA, adapters, fusion or decoder. Our step is the
method's task model: its encoder passes, fusion, decoder, loss, backward and AdamW step
(`pipeline.benchmarking.stage2_step`). The method's encoder passes alone (prompts, LoRA,
adapters; forward + backward, no fusion or decoder) are timed too, so the overhead splits into
the encoder's share and the fusion + decoder's. The same ratio in FLOPs (counted by
`torch.utils.flop_counter`) is what the method adds by construction: time above it is
implementation overhead (small kernels, memory-bound passes), the part worth profiling. On a
GPU all run under bf16 autocast (the trainer's `bf16-mixed`). Goal: step / floor <= 1.2 for
tp_mome.
"""

from __future__ import annotations

import argparse

import torch

from pipeline.benchmarking import (
    add_encoder_arguments,
    count_flops,
    benchmark_device,
    device_name,
    encoder_floor_step,
    encoder_from_arguments,
    method_encoder_step,
    stage2_setup,
    stage2_step,
    time_side_by_side,
)

MODALITIES = ("thermal", "depth")


def measure(method: str, backbone_args: dict, streams: list[str], *, image_size: int, batch_size: int,
            device: torch.device, bf16: bool, repeats: int, decoder_dim: int) -> dict[str, float]:
    """Seconds per step of `method` and of its floor, and their ratio."""
    with stage2_setup(backbone_args, streams, method, device, decoder={"embed_dim": decoder_dim}) as setup:
        batch = setup.batch(batch_size, image_size)
        steps = {"floor": lambda: encoder_floor_step(setup, batch),
                 "encoder": lambda: method_encoder_step(setup, batch),
                 "step": lambda: stage2_step(setup, batch)}
        times = time_side_by_side(steps, device, repeats=repeats, bf16=bf16)
        flops = {name: count_flops(step, device, bf16) for name, step in steps.items()}
    return {**times, "ratio": times["step"] / times["floor"], "flop_ratio": flops["step"] / flops["floor"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_encoder_arguments(parser)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--methods", nargs="+", default=["tp_mome", "iv_tuning", "cola"])
    parser.add_argument("--modalities", type=int, default=1, help="non-RGB streams (tp_mome; the seed methods take 1)")
    parser.add_argument("--decoder-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, bf16 = benchmark_device()
    backbone_args, encoder = encoder_from_arguments(args)
    print(f"device: {device_name(device)}; {encoder}, random weights, {args.image_size}px, batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}")
    print(f"{'method':<10} {'streams':<22} {'floor ms':>9} {'encoder ms':>10} {'step ms':>9} {'encoder/floor':>13} "
          f"{'step/floor':>10} {'in FLOPs':>8}")
    for method in args.methods:
        extra = args.modalities if method == "tp_mome" else 1
        streams = ["rgb", *MODALITIES[:extra]]
        result = measure(method, backbone_args, streams, image_size=args.image_size, batch_size=args.batch,
                         device=device, bf16=bf16, repeats=args.repeats, decoder_dim=args.decoder_dim)
        print(f"{method:<10} {'+'.join(streams):<22} {result['floor'] * 1000:9.1f} {result['encoder'] * 1000:10.1f} "
              f"{result['step'] * 1000:9.1f} {result['encoder'] / result['floor']:13.2f} {result['ratio']:10.2f} "
              f"{result['flop_ratio']:8.2f}")


if __name__ == "__main__":
    main()
