"""The training data loaders' images/s against what the training steps consume, side by side in one run.

    python benchmarks/loader_throughput.py [--root ../shared/data/msrs_rgbt_det] [--workers 2]

Real files: the MSRS RGB-thermal pairs (640x480 PNG) are sharded once into a temporary folder.
Then, for Stage 2 and for PSST's joint phase, the loader the stage trains with (shard reading,
PNG decoding, modality encoding, paired crops / DINO multi-crop, normalisation, collation, in
`--workers` dataloader processes) is timed alone, and so is the training step it feeds
(`pipeline.benchmarking`: tp_mome RGB + thermal; the PSST joint step), on the same batch size
and crop sizes. loader / consumption >= 2 means the step never waits for data. On a CPU the
two share the same cores when training, so read the ratio as an upper bound there; on a GPU
machine the loader has the CPU to itself.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from pipeline.benchmarking import (
    add_encoder_arguments,
    benchmark_device,
    device_name,
    encoder_from_arguments,
    loader_images_per_second,
    multicrop_batch,
    psst_joint_module,
    psst_joint_step,
    rgbt_encoders,
    shard_msrs_pairs,
    stage2_setup,
    stage2_step,
    task_training_loader,
    time_side_by_side,
    untimed_batches,
)
from pipeline.training.psst_data import MultiCrop, loader, multicrop_stream

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrs_rgbt_det"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MSRS pairs (visible/, infrared/, labels/)")
    parser.add_argument("--workers", type=int, default=2, help="dataloader processes (loader.num_workers)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=10, help="timed loader batches")
    parser.add_argument("--task-size", type=int, nargs=2, default=[224, 288], help="Stage-2 crops H W")
    parser.add_argument("--psst-size", type=int, default=128, help="PSST global crops (locals: half)")
    parser.add_argument("--local-crops", type=int, default=2)
    add_encoder_arguments(parser)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, bf16 = benchmark_device()
    backbone_args, encoder = encoder_from_arguments(args)
    with tempfile.TemporaryDirectory(prefix="xmodal-loader-") as tmp:
        shard_msrs_pairs(args.root, tmp, {"train": 1.0})
        urls, _, encoders = rgbt_encoders(Path(tmp), "train")
        task_loaded = loader_images_per_second(
            task_training_loader(encoders, urls, size=args.task_size, batch_size=args.batch, batches=args.batches,
                                 workers=args.workers), args.batch, args.batches)
        multicrop = MultiCrop(encoders["thermal"], global_size=[args.psst_size] * 2,
                              local_size=[args.psst_size // 2] * 2, local_crops=args.local_crops)
        epoch = args.batch * (args.batches + untimed_batches(args.workers))
        psst_stream = multicrop_stream(urls, multicrop, epoch_samples=epoch)
        psst_loaded = loader_images_per_second(loader(psst_stream, args.batch, args.workers), args.batch, args.batches)

    with stage2_setup(backbone_args, ["rgb", "thermal"], "tp_mome", device, decoder={"embed_dim": 64}) as setup:
        batch = setup.batch(args.batch, args.task_size)
        task_step = time_side_by_side({"step": lambda: stage2_step(setup, batch)}, device, repeats=args.repeats,
                                      bf16=bf16)["step"]
    module = psst_joint_module(backbone_args, device)
    views = multicrop_batch(args.batch, args.psst_size, args.local_crops, device)
    psst_step = time_side_by_side({"step": lambda: psst_joint_step(module, views)}, device, repeats=args.repeats,
                                  bf16=bf16)["step"]

    print(f"device: {device_name(device)}; loader: {args.workers} workers, batch {args.batch}, real MSRS pairs "
          f"(640x480 PNG); steps: {encoder}, "
          f"random weights, {'bf16 autocast' if bf16 else 'fp32'}")
    print(f"{'stage':<34} {'loader img/s':>12} {'step img/s':>11} {'loader/step':>11}")
    rows = [(f"Stage 2 tp_mome RGB+T {args.task_size[0]}x{args.task_size[1]}", task_loaded, args.batch / task_step),
            (f"PSST joint {args.psst_size}px x2 + {args.psst_size // 2}px x{args.local_crops}", psst_loaded,
             args.batch / psst_step)]
    for name, loaded, consumed in rows:
        print(f"{name:<34} {loaded:12.1f} {consumed:11.1f} {loaded / consumed:11.2f}")


if __name__ == "__main__":
    main()
