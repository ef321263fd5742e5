"""Whether each memory lever pays: a Stage-2 training step with the lever on against the same step
without it, side by side in one run.

    python benchmarks/levers.py                                    # CPU: narrow Hiera-T, 128 px, batch 4
    python benchmarks/levers.py --method iv_tuning --levers compile
    python benchmarks/levers.py --backbone sam2_hiera_base_plus --embed-dim 0 --image-size 512 --batch 8

Levers (`memory.*`, off by default): `channels_last` (NHWC convolution weights),
`activation_checkpointing` (every stage: memory for recomputation, so it costs time by design) and
`compile` (every encoder block through `torch.compile`; the first step compiles, which on a
2-core CPU takes minutes with inductor). Each lever runs on its own copy of the model; the first
step of the levered copy is reported apart (compilation). On a GPU all run under bf16 autocast;
the GPU suite (`gpu_suite.py`) runs the same comparison at the real scale with peak memory.
"""

from __future__ import annotations

import argparse

from pipeline.benchmarking import (
    LEVERS,
    add_encoder_arguments,
    benchmark_device,
    device_name,
    encoder_from_arguments,
    lever_pair,
    stage2_step,
    time_call,
    time_side_by_side,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_encoder_arguments(parser)
    parser.add_argument("--method", default="tp_mome")
    parser.add_argument("--levers", nargs="+", default=list(LEVERS), choices=LEVERS)
    parser.add_argument("--compile-backend", default="inductor")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decoder-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device, bf16 = benchmark_device()
    backbone_args, encoder = encoder_from_arguments(args)
    print(f"device: {device_name(device)}; {encoder}, random weights, {args.method} rgb+thermal, "
          f"{args.image_size}px, batch {args.batch}, {'bf16 autocast' if bf16 else 'fp32'}")
    print(f"{'lever':<25} {'plain ms':>9} {'lever ms':>9} {'lever/plain':>11} {'first step s':>12}")
    for lever in args.levers:
        with lever_pair(backbone_args, ["rgb", "thermal"], args.method, device, lever, args.compile_backend,
                        decoder={"embed_dim": args.decoder_dim}) as (plain, levered):
            batch = plain.batch(args.batch, args.image_size)
            first = time_call(lambda: stage2_step(levered, batch), device, bf16)
            times = time_side_by_side({"plain": lambda: stage2_step(plain, batch),
                                       "lever": lambda: stage2_step(levered, batch)},
                                      device, repeats=args.repeats, bf16=bf16)
        print(f"{lever:<25} {times['plain'] * 1000:9.1f} {times['lever'] * 1000:9.1f} "
              f"{times['lever'] / times['plain']:11.2f} {first:12.1f}")


if __name__ == "__main__":
    main()
