"""Object detection over the fused four-scale features: torchvision's FCOS on an FPN.

Everything that makes a detector a detector comes from torchvision: the FPN
(`torchvision.ops.FeaturePyramidNetwork` with FCOS's P6/P7 blocks), the anchor points
(`AnchorGenerator`, one point per location, sized by the level's stride as FCOS uses them),
the head (`FCOSHead`: classification, box regression and centre-ness towers), the loss
(`FCOS.compute_loss`: centre sampling, scale ranges, sigmoid focal loss, GIoU, centre-ness BCE)
and the post-processing (`FCOS.postprocess_detections`: score threshold, top-k, class-wise NMS
via `torchvision.ops.batched_nms`). Nothing here codes, matches or suppresses boxes by hand.

One change to the loss, for data parallelism: torchvision divides each loss by the number of
foreground locations *on its own rank*, so under DDP's gradient mean a rank holding one small
object weighs as much as a rank holding fifty. `RankAveragedFCOSHead` divides by the count
averaged over the ranks instead (mmdetection's FCOS: `reduce_mean(num_pos)`), which makes R ranks
train exactly as one process on the whole global batch (tested on 2 gloo ranks). Gradient
accumulation still normalises per micro-batch, as in mmdetection.

The fused maps arrive at strides 4, 8, 16, 32 (finest first). `strides` picks the ones the FPN
reads (FCOS's own P3-P5: 8, 16, 32 by default; add 4 for very small objects), and `extra_levels`
adds FCOS's P6/P7 (strides 64, 128) from the coarsest FPN output. Anchor sizes equal the
strides, so FCOS's scale ranges (4x to 8x the stride per level) are the paper's.

torchvision's `FCOS` wraps a backbone and an input transform (resize, normalise); here the FPN is
its backbone and its transform is never called: the task data path has already encoded,
normalised and sized the images, and evaluation runs at the size the task gives (boxes are
mapped back to the native size by the caller when that differs).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchvision.models.detection import FCOS
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

FUSED_STRIDES = (4, 8, 16, 32)


class FusedPyramid(nn.Module):
    """The FPN over the chosen fused maps (the `backbone` of torchvision's FCOS)."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], out_channels: int, extra_levels: bool):
        super().__init__()
        unknown = [s for s in strides if s not in FUSED_STRIDES]
        if unknown or list(strides) != sorted(set(strides)):
            raise ValueError(f"detection strides {list(strides)} must be increasing values of {list(FUSED_STRIDES)}")
        self.indices = [FUSED_STRIDES.index(s) for s in strides]
        self.out_channels = out_channels
        self.fpn = FeaturePyramidNetwork(
            [in_channels[i] for i in self.indices], out_channels,
            extra_blocks=LastLevelP6P7(out_channels, out_channels) if extra_levels else None,
        )

    def forward(self, features: Sequence[Tensor]) -> OrderedDict[str, Tensor]:
        return self.fpn(OrderedDict((str(i), features[i]) for i in self.indices))


class RankAveragedFCOSHead(FCOSHead):
    """torchvision's FCOS head with its losses normalised by the foreground count averaged over
    the data-parallel ranks (at least 1, as mmdetection), not by the rank's own count."""

    def compute_loss(self, targets, head_outputs, anchors, matched_idxs) -> dict[str, Tensor]:
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return losses
        own = torch.stack(matched_idxs).ge(0).sum().to(torch.float32)  # what torchvision divided by
        mean = own.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        return {name: loss * own.clamp(min=1) / mean.clamp(min=1) for name, loss in losses.items()}


@dataclass
class DetectionOutputs:
    """What the head computed for a batch: enough for the FCOS loss (training) or for boxes
    (evaluation); `detector` is the head that made them."""

    detector: FCOS
    head_outputs: dict[str, Tensor]
    anchors: list[Tensor]
    num_anchors_per_level: list[int]
    image_sizes: list[tuple[int, int]]

    def losses(self, targets: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """FCOS's losses for per-image targets {"boxes": (N, 4) xyxy pixels, "labels": (N,),
        "crowd": (N,) optional}. Crowd (ignore) boxes are no targets; FCOS has no ignore label,
        so locations inside them count as background."""
        device = self.anchors[0].device
        keep = [~t["crowd"].bool() if "crowd" in t else torch.ones(len(t["labels"]), dtype=torch.bool)
                for t in targets]
        targets = [{"boxes": t["boxes"][k].float().to(device), "labels": t["labels"][k].long().to(device)}
                   for t, k in zip(targets, keep, strict=True)]
        with torch.autocast(device.type, enabled=False):
            return self.detector.compute_loss(targets, self._float_outputs(), self.anchors,
                                              self.num_anchors_per_level)

    def detections(self) -> list[dict[str, Tensor]]:
        """Per image {"boxes", "scores", "labels"} after FCOS's threshold, top-k and NMS."""
        split_outputs = {k: list(v.split(self.num_anchors_per_level, dim=1)) for k, v in self._float_outputs().items()}
        split_anchors = [list(a.split(self.num_anchors_per_level)) for a in self.anchors]
        with torch.autocast(self.anchors[0].device.type, enabled=False):
            return self.detector.postprocess_detections(split_outputs, split_anchors, self.image_sizes)

    def _float_outputs(self) -> dict[str, Tensor]:
        """The head's outputs in float32: under bf16 autocast, box offsets of a 640-pixel image
        would be decoded with 8 bits of mantissa (steps of 2-4 pixels)."""
        return {k: v.float() for k, v in self.head_outputs.items()}


class FCOSDetectionHead(nn.Module):
    """FCOS (Tian et al., ICCV 2019) as torchvision builds it, over an FPN on the fused maps."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, *, strides: Sequence[int] = (8, 16, 32),
                 extra_levels: bool = True, fpn_channels: int = 256, num_convs: int = 4,
                 center_sampling_radius: float = 1.5, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000):
        super().__init__()
        if len(in_channels) != len(FUSED_STRIDES):
            raise ValueError(f"detection reads {len(FUSED_STRIDES)} fused maps, got {len(in_channels)} channel counts")
        if num_classes < 1:
            raise ValueError(f"detection needs at least one class, got num_classes={num_classes}")
        if fpn_channels % 32:
            raise ValueError(f"decoder.fpn_channels={fpn_channels}: FCOS's head normalises with GroupNorm(32), "
                             "so it must be a multiple of 32")
        pyramid = FusedPyramid(in_channels, strides, fpn_channels, extra_levels)
        level_strides = [*strides, *((strides[-1] * 2, strides[-1] * 4) if extra_levels else ())]
        anchors = AnchorGenerator(sizes=tuple((s,) for s in level_strides),
                                  aspect_ratios=((1.0,),) * len(level_strides))
        head = RankAveragedFCOSHead(fpn_channels, anchors.num_anchors_per_location()[0], num_classes,
                                    num_convs=num_convs)
        self.detector = FCOS(pyramid, num_classes, anchor_generator=anchors, head=head,
                             center_sampling_radius=center_sampling_radius, score_thresh=score_thresh,
                             nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                             topk_candidates=topk_candidates)
        self.num_classes = num_classes

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int] | None = None) -> DetectionOutputs:
        """Fused maps (finest first, stride 4 first) of images of `out_size` (default: 4x the
        finest map) -> `DetectionOutputs` (boxes are in that image's pixels)."""
        size = tuple(out_size) if out_size is not None else tuple(4 * d for d in features[0].shape[-2:])
        levels = list(self.detector.backbone(features).values())
        head_outputs = self.detector.head(levels)
        batch = features[0].shape[0]
        # AnchorGenerator reads only sizes, dtype and device from the images and the levels (it takes
        # the levels' dtype): empty float32 stand-ins whatever the autocast dtype, so anchor points
        # are exact pixel positions
        images = ImageList(features[0].new_empty((batch, 0, *size), dtype=torch.float32), [size] * batch)
        grids = [x.new_empty((0, 0, *x.shape[-2:]), dtype=torch.float32) for x in levels]
        anchors = self.detector.anchor_generator(images, grids)
        return DetectionOutputs(self.detector, head_outputs, anchors, [x.shape[2] * x.shape[3] for x in levels],
                                [size] * batch)

    def protocol(self) -> dict[str, float | int]:
        """The post-processing settings every reported number depends on (for metrics.json)."""
        d = self.detector
        return {"score_thresh": d.score_thresh, "nms_thresh": d.nms_thresh,
                "detections_per_img": d.detections_per_img, "topk_candidates": d.topk_candidates}


def detection_loss(outputs: DetectionOutputs, targets: Sequence[Mapping[str, Tensor]]) -> Tensor:
    """The sum of FCOS's classification (focal), box regression (GIoU) and centre-ness losses."""
    return torch.stack(list(outputs.losses(targets).values())).sum()
