"""Object detection metrics: COCO mAP as torchmetrics' `MeanAveragePrecision` computes it.

The COCO definitions (pycocotools behind torchmetrics): AP averaged over IoU thresholds
0.50:0.05:0.95 and 101 recall points, AP at IoU 0.50 and 0.75, AP by object size, recall at 100
detections, and AP per class. Ground-truth boxes flagged crowd (VOC `difficult`, HIT-UAV's
`DontCare`, see pipeline/data/readers/boxes.py) are COCO `iscrowd` regions: a detection that
matches one is neither a true nor a false positive.

Under DDP every rank sees its own shards. COCO AP ranks all detections of the split together,
so it cannot be summed from per-rank parts: the predictions and targets are gathered
(`gather_objects`) and every rank computes the same numbers from all of them, with
torchmetrics' own syncing off (its list states would be gathered with collectives that a rank
without images of a group would not join).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics.detection import MeanAveragePrecision

from pipeline.distributed import gather_objects

IOU_THRESHOLDS = [round(0.5 + 0.05 * i, 2) for i in range(10)]
MAX_DETECTIONS = [1, 10, 100]
SUMMARY_KEYS = ("map", "map_50", "map_75", "map_small", "map_medium", "map_large", "mar_1", "mar_10", "mar_100")


class DetectionMetrics:
    """mAP, mAP@50, mAP@75, AP by size, recall and per-class AP over a split (module docstring).

    `update` takes per-image predictions {"boxes" (N, 4) xyxy pixels, "scores", "labels"} and
    targets {"boxes", "labels", "crowd" (bool, optional)}, at the same (native) resolution.
    """

    def __init__(self, class_names: Sequence[str]):
        self.class_names = list(class_names)
        self.preds: list[dict[str, Tensor]] = []
        self.targets: list[dict[str, Tensor]] = []

    def to(self, device: torch.device | str) -> DetectionMetrics:
        """Kept on the CPU whatever the model's device: pycocotools computes there."""
        return self

    def update(self, preds: Sequence[Mapping[str, Tensor]], targets: Sequence[Mapping[str, Tensor]]) -> None:
        if len(preds) != len(targets):
            raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
        for pred, target in zip(preds, targets, strict=True):
            self.preds.append({k: pred[k].detach().cpu() for k in ("boxes", "scores", "labels")})
            crowd = target.get("crowd")
            labels = target["labels"].detach().cpu().long()
            self.targets.append({"boxes": target["boxes"].detach().cpu().float(), "labels": labels,
                                 "iscrowd": (crowd.detach().cpu().long() if crowd is not None
                                             else torch.zeros_like(labels))})

    def compute(self) -> dict[str, Any]:
        """JSON-ready scores over every rank's images; undefined values (no box of a class) are None."""
        preds, targets = [], []
        for part_preds, part_targets in gather_objects((self.preds, self.targets)):
            preds += part_preds
            targets += part_targets
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=IOU_THRESHOLDS,
                                      max_detection_thresholds=MAX_DETECTIONS, class_metrics=True,
                                      backend="pycocotools", sync_on_compute=False)
        metric.update(preds, targets)
        result = metric.compute()
        per_class = {name: None for name in self.class_names}
        for cls, ap in zip(result["classes"].reshape(-1).tolist(), result["map_per_class"].reshape(-1).tolist(),
                           strict=True):
            if 0 <= cls < len(self.class_names):
                per_class[self.class_names[cls]] = _defined(ap)
        return {
            **{key: _defined(float(result[key])) for key in SUMMARY_KEYS},
            "per_class_ap": per_class,
            "images": len(targets),
            "boxes": sum(int((t["iscrowd"] == 0).sum()) for t in targets),
            "crowd_boxes": sum(int(t["iscrowd"].sum()) for t in targets),
            "detections": sum(len(p["boxes"]) for p in preds),
        }


def _defined(value: float) -> float | None:
    """torchmetrics reports -1 where a score is undefined (e.g. no ground truth of a size)."""
    return None if value < 0 else value


PROTOCOL = {
    "iou_thresholds": IOU_THRESHOLDS,
    "max_detections": MAX_DETECTIONS,
    "definitions": "COCO (pycocotools via torchmetrics MeanAveragePrecision): map = AP over IoU 0.50:0.95, "
                   "101-point interpolation; map_50 / map_75 at IoU 0.50 / 0.75; mar_100 = recall at 100 "
                   "detections; crowd (ignore) boxes neither match nor penalise detections",
}
