"""Task decoders over the four fused feature maps: SegFormer's all-MLP head, for segmentation and SOD.

The all-MLP head (SegFormer) projects every scale to `embed_dim` with a linear layer (1x1
conv), upsamples all of them to the finest (stride-4) grid, concatenates, fuses with a 1x1 conv
+ BatchNorm + ReLU, and predicts per-pixel logits. It is light and uses every scale alike,
so the comparison between fusion methods is not decided by decoder capacity. Salient object
detection is the same head with one output channel (a saliency logit).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AllMLPHead(nn.Module):
    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1
    ):
        super().__init__()
        self.project = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(in_channels) * embed_dim, embed_dim, kernel_size=1, bias=False),  # BN has the bias
            nn.BatchNorm2d(embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)  # SegFormer drops whole channels
        self.classify = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        """Multi-scale maps, finest first -> logits (B, num_classes, *grid of features[0] or out_size)."""
        grid = features[0].shape[-2:]
        projected = [
            F.interpolate(p(f), size=grid, mode="bilinear", align_corners=False)
            for p, f in zip(self.project, features, strict=True)
        ]
        logits = self.classify(self.dropout(self.fuse(torch.cat(projected, dim=1))))
        if out_size is not None:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


class SODHead(AllMLPHead):
    """Salient object detection: the all-MLP head with one saliency logit per pixel."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 256, dropout: float = 0.1):
        super().__init__(in_channels, 1, embed_dim, dropout)


DECODERS = ("segmentation", "sod")


def build_decoder(kind: str, in_channels: Sequence[int], num_classes: int, **kwargs) -> AllMLPHead:
    """Decoder for a task; kwargs (embed_dim, dropout) go to the head."""
    if kind == "segmentation":
        return AllMLPHead(in_channels, num_classes, **kwargs)
    if kind == "sod":
        if num_classes != 1:
            raise ValueError(f"sod predicts one saliency channel, got num_classes={num_classes}")
        return SODHead(in_channels, **kwargs)
    raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
