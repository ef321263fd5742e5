"""Evaluation and PSST subset scoring against the plain encoder forward, side by side in one run.

    python benchmarks/inference_throughput.py [--root ../shared/data/msrs_rgbt_det] [--images 24]

Evaluation: `evaluate_model` as `evaluate@<task>` runs it (shard reading and decoding in
`--workers` loader processes, the task model, boxes scaled to the native size, COCO mAP updates
per group) on real MSRS RGB-thermal pairs at their native 640x480, with a tp_mome detection
model, against the floor: the plain frozen encoder's forward of every stream on the same images,
already in memory. The model alone (task model forward + detection post-processing on the
in-memory images) is timed too, so the overhead splits into model and loading + metrics.

Subset scoring: `reconstruction_scores` with `--masks` keyed masks per image (what
`psst_select` runs) against one plain forward of the LoRA encoder on the same images; scoring
makes one masked pass per mask, so its floor is `--masks` forwards and the per-mask ratio is the
one to read.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from pipeline.benchmarking import (
    add_encoder_arguments,
    benchmark_device,
    device_name,
    encoder_from_arguments,
    encoder_forward,
    psst_joint_module,
    rgbt_encoders,
    shard_msrs_pairs,
    stage2_setup,
    subset_scores,
    time_side_by_side,
)
from pipeline.training.task_data import TaskSample, collate_task, task_eval_stream
from pipeline.training.tasks import evaluate_model

DEFAULT_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "msrs_rgbt_det"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="MSRS pairs (visible/, infrared/, labels/)")
    parser.add_argument("--images", type=int, default=24, help="pairs evaluated (a seeded split of the 240)")
    parser.add_argument("--workers", type=int, default=2, help="evaluation loader processes (loader.num_workers)")
    parser.add_argument("--batch", type=int, default=8)
    add_encoder_arguments(parser)
    parser.add_argument("--fpn-channels", type=int, default=64)
    parser.add_argument("--score-size", type=int, default=128, help="PSST scoring resolution")
    parser.add_argument("--masks", type=int, default=4, help="masks per image in scoring (psst.select.num_masks)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device, bf16 = benchmark_device()
    backbone_args, encoder = encoder_from_arguments(args)
    decoder = {"architecture": "fcos", "fpn_channels": args.fpn_channels, "strides": [8, 16, 32]}
    with tempfile.TemporaryDirectory(prefix="xmodal-eval-") as tmp, \
            stage2_setup(backbone_args, ["rgb", "thermal"], "tp_mome", device, head="detection", num_classes=3,
                         decoder=decoder) as setup:
        fraction = args.images / 240
        shard_msrs_pairs(args.root, tmp, {"test": fraction, "rest": 1 - fraction})
        urls, manifest, encoders = rgbt_encoders(Path(tmp), "test")
        transform = TaskSample(encoders, head="detection", geometry=None)
        model, floor = setup.model.eval(), setup.floor_encoder.eval()
        samples = list(task_eval_stream(urls, transform))
        batches = [collate_task(samples[i: i + args.batch]) for i in range(0, len(samples), args.batch)]
        inputs = [{s: b[s].to(device) for s in setup.streams} for b in batches]
        classes = {"names": manifest["box_class_names"]}

        def evaluation() -> None:
            evaluate_model(model, task_eval_stream(urls, transform), head="detection", classes=classes,
                           batch_size=args.batch, num_workers=args.workers, progress=False)

        @torch.no_grad()
        def model_only() -> None:
            for batch in inputs:
                model(batch).detections()

        def plain_forward() -> None:
            for batch in inputs:
                for images in batch.values():
                    encoder_forward(floor, images)

        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            eval_times = time_side_by_side({"floor": plain_forward, "model": model_only, "evaluate": evaluation},
                                           device, repeats=args.repeats)

    network = psst_joint_module(backbone_args, device).network.eval()
    thermal = torch.nn.functional.interpolate(torch.cat([b["thermal"] for b in inputs])[: args.batch],
                                              size=(args.score_size, args.score_size), mode="bilinear")
    keys = [f"image{i}" for i in range(len(thermal))]
    score_times = time_side_by_side({"floor": lambda: encoder_forward(network.backbone, thermal),
                                     "scores": lambda: subset_scores(network, keys, thermal, args.masks)},
                                    device, repeats=args.repeats, bf16=bf16)

    count = len(samples)
    print(f"device: {device_name(device)}; {encoder}, "
          f"random weights, {'bf16 autocast' if bf16 else 'fp32'}, batch {args.batch}")
    print(f"evaluation: {count} real MSRS pairs at 640x480, tp_mome RGB+T, FCOS, COCO mAP by torchmetrics, "
          f"{args.workers} loader workers")
    floor_rate = count / eval_times["floor"]
    for name, key in (("plain encoder forward, 2 streams (floor)", "floor"), ("task model + post-processing", "model"),
                      ("evaluate_model end to end", "evaluate")):
        rate = count / eval_times[key]
        print(f"  {name:<42} {rate:8.2f} img/s   floor/this {floor_rate / rate:5.2f}")
    print(f"subset scoring: {len(thermal)} thermal images at {args.score_size}px, {args.masks} masks each")
    forward, scores = score_times["floor"], score_times["scores"]
    print(f"  plain LoRA encoder forward {len(thermal) / forward:8.2f} img/s; scoring {len(thermal) / scores:8.2f} img/s; "
          f"scoring/forward {scores / forward:.2f} ({scores / forward / args.masks:.2f} per mask)")


if __name__ == "__main__":
    main()
