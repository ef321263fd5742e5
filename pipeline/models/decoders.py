"""Task decoders over the four fused feature maps: SegFormer's all-MLP head, for segmentation and SOD,
and a CPNet-style progressive head for SOD.

The all-MLP head (SegFormer) projects every scale to `embed_dim` with a linear layer (1x1
conv), upsamples all of them to the finest (stride-4) grid, concatenates, fuses with a 1x1 conv
+ BatchNorm + ReLU, and predicts per-pixel logits. It is light and uses every scale alike,
so the comparison between fusion methods is not decided by decoder capacity. Salient object
detection is the same head with one output channel (a saliency logit).

The decoder architecture is chosen apart from the task: `build_decoder(..., architecture=...)`
takes "all_mlp" (the default, both dense tasks) or "progressive" (`ProgressiveSODHead`, SOD only);
detection takes torchvision's FCOS on an FPN (`pipeline/models/detection.py`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.models.detection import FCOSDetectionHead

NORMS = ("batch", "group")


def normalization(kind: str, channels: int) -> nn.Module:
    """The decoders' normalisation layer. `batch` (SegFormer's and CPNet's BatchNorm) normalises
    over each process's micro-batch, so 2 x b, 1 x b accumulated and 1 x 2b train different
    models unless BatchNorm is synced (`trainer.sync_batchnorm`, GPU only). `group`
    (GroupNorm, 32 groups or fewer) is per sample: every layout trains the same model."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    raise ValueError(f"decoder norm {kind!r} is not one of {', '.join(NORMS)}")


class AllMLPHead(nn.Module):
    def __init__(
        self, in_channels: Sequence[int], num_classes: int, embed_dim: int = 256, dropout: float = 0.1,
        norm: str = "batch",
    ):
        super().__init__()
        self.embed_dim = embed_dim
        self.project = nn.ModuleList(nn.Conv2d(c, embed_dim, kernel_size=1) for c in in_channels)
        self.fuse = nn.Sequential(
            nn.Conv2d(len(in_channels) * embed_dim, embed_dim, kernel_size=1, bias=False),  # the norm has the bias
            normalization(norm, embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout2d(dropout)  # SegFormer drops whole channels
        self.classify = nn.Conv2d(embed_dim, num_classes, kernel_size=1)

    def forward(self, features: Sequence[Tensor], out_size: tuple[int, int] | None = None) -> Tensor:
        """Multi-scale maps, finest first -> logits (B, num_classes, *grid of features[0] or out_size).

        SegFormer's head reads fuse(cat_i up(P_i f_i)), but the 1x1 projections P_i, the bilinear
        upsampling (weights summing to 1, so biases pass through) and the fuse conv are all linear,
        so that equals sum_i up((F_i P_i) f_i), F_i the fuse conv's slice for scale i. Computed so:
        one conv per scale at its own resolution, no concatenated (B, 4*embed, H/4, W/4) tensor
        and no 4*embed -> embed conv at stride 4, the head's largest cost (at 512 px and embed
        256, 4x its other convs). Same parameters, same function up to float rounding (tested
        against the concat-then-fuse reading)."""
        grid = features[0].shape[-2:]
        fuse = self.fuse[0].weight.flatten(1).split(self.embed_dim, dim=1)  # F_i: (embed, embed) each
        fused = sum(
            _resize(F.conv2d(f, (f_i @ p.weight.flatten(1))[..., None, None], f_i @ p.bias), grid)
            for f_i, p, f in zip(fuse, self.project, features, strict=True)
        )
        logits = self.classify(self.dropout(self.fuse[1:](fused)))
        if out_size is not None:
            logits = F.interpolate(logits, size=out_size, mode="bilinear", align_corners=False)
        return logits


class SODHead(AllMLPHead):
    """Salient object detection: the all-MLP head with one saliency logit per pixel."""

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 256, dropout: float = 0.1, norm: str = "batch"):
        super().__init__(in_channels, 1, embed_dim, dropout, norm)


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False),  # the norm has the bias
        normalization(norm, out_ch),
        nn.ReLU(inplace=True),
    )


class ProgressiveSODHead(nn.Module):
    """CPNet-style progressive (coarse-to-fine) decoder with one saliency logit per pixel.

    CPNet (Hu et al., "Cross-Modal Fusion and Progressive Decoding Network for RGB-D Salient
    Object Detection") decodes top-down: the stride-32 map is filtered by a 3x3 conv + BN +
    activation and upsampled x2, concatenated with the fused map of the next finer level,
    filtered again by a 3x3 conv block (and a ConvNeXt-style block), and so on down to the
    finest level, where a small conv head predicts the saliency map. Unlike the all-MLP head,
    coarse context is passed on and refined step by step rather than merged in one shot.

    Here: each level is first projected to `embed_dim` (1x1 conv + BN + ReLU); the coarsest is
    filtered by a 3x3 conv block; then at each finer level the running map is bilinearly
    upsampled to that level's grid (x2 for the usual pyramid), concatenated with its projection
    and filtered by a 3x3 conv block (2*embed_dim -> embed_dim); at stride 4 a 3x3 conv after
    channel dropout predicts the logit, upsampled to `out_size` if given.

    Differences from CPNet, to keep the head small and comparable with `SODHead`:
    - a constant width `embed_dim` at every level (CPNet halves 1024 -> 64 going finer);
    - ReLU instead of GELU, `align_corners=False` upsampling like the all-MLP head;
    - no ConvNeXt refinement blocks (CPNet's FA_Block) after each merge;
    - the logit is predicted at stride 4 and upsampled bilinearly (CPNet upsamples the features
      twice more, to stride 1, inside its prediction head);
    - CPNet's deep supervision is optional (`deep_supervision=True`): a 3x3 conv predicts a side
      logit from each of the coarser decoder stages (strides 32, 16, 8 for the usual pyramid),
      and in training the head returns (final, *sides), all at `out_size`, each trained with the
      task loss at equal weight; in eval it returns the final map only;
    - CPNet's cross-modal fusion (coordinate / spatial attention) is not part of the decoder;
      fusion happens upstream, so this head sees one fused map per scale.
    """

    def __init__(self, in_channels: Sequence[int], embed_dim: int = 64, dropout: float = 0.1, norm: str = "batch",
                 deep_supervision: bool = False):
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"progressive decoding needs at least two scales, got {len(in_channels)}")
        self.project = nn.ModuleList(_conv_bn_relu(c, embed_dim, 1, norm) for c in in_channels)
        self.top = _conv_bn_relu(embed_dim, embed_dim, 3, norm)
        # merge[i] fuses the upsampled coarser map with level i (finest first); none for the coarsest.
        self.merge = nn.ModuleList(_conv_bn_relu(2 * embed_dim, embed_dim, 3, norm) for _ in in_channels[:-1])
        self.dropout = nn.Dropout2d(dropout)
        self.predict = nn.Conv2d(embed_dim, 1, kernel_size=3, padding=1)
        # side[j] predicts from the j-th decoder stage, coarsest first (empty: no deep supervision)
        self.side = nn.ModuleList(
            nn.Conv2d(embed_dim, 1, kernel_size=3, padding=1) for _ in in_channels[:-1] if deep_supervision
        )

    def forward(
        self, features: Sequence[Tensor], out_size: tuple[int, int] | None = None
    ) -> Tensor | tuple[Tensor, ...]:
        """Multi-scale maps, finest first -> saliency logits (B, 1, *grid of features[0] or out_size);
        with deep supervision in training, (final, *side logits coarsest first), all that size."""
        if len(features) != len(self.project):
            raise ValueError(f"expected {len(self.project)} feature maps, got {len(features)}")
        x = self.top(self.project[-1](features[-1]))
        stages = []
        for i in range(len(features) - 2, -1, -1):
            stages.append(x)
            level = self.project[i](features[i])
            x = F.interpolate(x, size=level.shape[-2:], mode="bilinear", align_corners=False)
            x = self.merge[i](torch.cat((x, level), dim=1))
        size = out_size or tuple(features[0].shape[-2:])
        logits = _resize(self.predict(self.dropout(x)), size)
        if not (self.training and len(self.side)):
            return logits
        return (logits, *(_resize(side(stage), size) for side, stage in zip(self.side, stages, strict=True)))


def _resize(logits: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


DECODERS = ("segmentation", "sod", "detection")
ARCHITECTURES = {"segmentation": ("all_mlp",), "sod": ("all_mlp", "progressive"), "detection": ("fcos",)}


def build_decoder(
    kind: str, in_channels: Sequence[int], num_classes: int, *, architecture: str | None = None, **kwargs
) -> nn.Module:
    """Decoder for a task; `architecture` picks the head (default: the task's first, all_mlp or
    fcos; "progressive" for sod; fcos is pipeline/models/detection.py); other kwargs
    (embed_dim, dropout, norm; fpn_channels, strides, ... for FCOS) go to the head."""
    if kind not in ARCHITECTURES:
        raise ValueError(f"unknown decoder {kind!r}; choose one of {', '.join(DECODERS)}")
    architecture = architecture or ARCHITECTURES[kind][0]
    if architecture not in ARCHITECTURES[kind]:
        raise ValueError(
            f"decoder architecture {architecture!r} is not available for {kind!r}; "
            f"choose one of {', '.join(ARCHITECTURES[kind])}"
        )
    if kind == "segmentation":
        return AllMLPHead(in_channels, num_classes, **kwargs)
    if kind == "detection":
        return FCOSDetectionHead(in_channels, num_classes, **kwargs)
    if num_classes != 1:
        raise ValueError(f"sod predicts one saliency channel, got num_classes={num_classes}")
    if architecture == "progressive":
        return ProgressiveSODHead(in_channels, **kwargs)
    return SODHead(in_channels, **kwargs)
