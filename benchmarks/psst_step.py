"""One PSST joint-phase training step against its floor, measured side by side in one run.

    python benchmarks/psst_step.py                       # CPU: Hiera-T, 128 px, batch 4
    python benchmarks/psst_step.py --backbone sam2_hiera_base_plus --image-size 512 --batch 8

The floor is the work the joint phase cannot avoid: the student's forward + backward through
the frozen encoder with plain LoRA on the same crops (globals and locals), plus the teacher's
forward on the global crops, with no mask token, decoder, heads, losses or EMA. Our step is
`JointTraining.training_step` + backward + the EMA update (`pipeline.benchmarking`). Both run on
the same batch and are timed alternately; the ratio says what PSST's extra work costs. On a GPU
the step runs in bf16 autocast, and images/s and peak memory are printed too.
"""

from __future__ import annotations

import argparse

from pipeline.benchmarking import (
    add_encoder_arguments,
    benchmark_device,
    device_name,
    encoder_from_arguments,
    multicrop_batch,
    peak_memory_bytes,
    psst_joint_floor_step,
    psst_joint_module,
    psst_joint_step,
    time_side_by_side,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_encoder_arguments(parser, embed_dim=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--local-crops", type=int, default=2)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, bf16 = benchmark_device()
    backbone_args, encoder = encoder_from_arguments(args)
    module = psst_joint_module(backbone_args, device, rank=args.rank)
    batch = multicrop_batch(args.batch, args.image_size, args.local_crops, device)
    times = time_side_by_side({"floor": lambda: psst_joint_floor_step(module, batch),
                               "step": lambda: psst_joint_step(module, batch)}, device, repeats=args.repeats, bf16=bf16)

    print(f"device: {device_name(device)}; {encoder} (random weights), {args.image_size}px globals x2, "
          f"{args.image_size // 2}px locals x{args.local_crops}, batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}")
    print(f"floor (plain LoRA student fwd+bwd + teacher fwd): {times['floor'] * 1000:8.1f} ms/step")
    print(f"PSST joint step (masking, decoder, heads, losses, EMA): {times['step'] * 1000:8.1f} ms/step")
    print(f"ratio PSST/floor: {times['step'] / times['floor']:.2f}")
    if device.type == "cuda":
        peak = peak_memory_bytes(lambda: psst_joint_step(module, batch), device, bf16)
        print(f"images/s (samples of 2 globals + {args.local_crops} locals): {args.batch / times['step']:.1f}; "
              f"peak memory {peak / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
