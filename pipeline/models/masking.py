"""Masked inputs for Hiera: a learned mask token inserted after the patch embedding.

HieraDet takes no mask argument and its windowed attention needs the full token grid, so masked
image modelling here is SimMIM-style: masked tokens are *replaced* by a learned token (not
dropped, as in MAE). A mask unit is 32 px, one final-stage token, i.e. an 8x8 block of the
stride-4 patch tokens. The token goes in before the position embedding is added, so a masked
unit still knows where it is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from pipeline.models.backbone import Backbone, TokenBackbone

MASK_UNIT = 32  # px: one final-stage (stride-32) token


def random_unit_mask(
    batch: int, grid: tuple[int, int], ratio: float, generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, h, w) bool, True = masked; exactly round(ratio * h * w) units per image, chosen
    uniformly (argsort of noise, as in MAE), so every image contributes the same number."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    h, w = grid
    count = round(ratio * h * w)
    noise = torch.rand(batch, h * w, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)
    return (ranks < count).reshape(batch, h, w)


def keyed_masks(keys: Sequence[str], grid: tuple[int, int], ratio: float, seed: int, draw: int = 0,
                device: torch.device | str | None = None) -> Tensor:
    """(B, h, w) `random_unit_mask`s, image i's from a generator seeded by (seed, draw, keys[i])
    alone. An image gets the same mask whichever rank, batch position or micro-batch it lands
    in, so N processes, gradient accumulation, a resumed run and a 1-process run all mask it
    alike, while different images (hence different ranks) get different masks. `draw` (the
    optimizer step in training, so a resampled image is masked anew) gives the same image a
    new mask."""
    masks = [random_unit_mask(1, grid, ratio, torch.Generator().manual_seed(_key_seed(seed, draw, key)))
             for key in keys]
    return torch.cat(masks).to(device)


def scoring_masks(keys: Sequence[str], grid: tuple[int, int], ratio: float, seed: int, count: int,
                  device: torch.device | str | None = None) -> list[Tensor]:
    """The `count` masks subset selection scores each image with: keyed draws -1, -2, ...
    (negative, so never a training step's draw), so an image's scores follow from its key."""
    return [keyed_masks(keys, grid, ratio, seed, -draw, device) for draw in range(1, count + 1)]


def _key_seed(seed: int, draw: int, key: str) -> int:
    digest = hashlib.sha256(f"{seed}:{draw}:{key}".encode()).digest()  # stable across processes
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class MaskedEncoder(nn.Module):
    """A token-splittable backbone (Hiera, Swin) plus one learned mask token.

    `forward(x, mask)` with `mask` (B, H/32, W/32) returns the backbone's four maps computed
    from the image with masked units replaced by the mask token; `mask=None` is the plain
    forward.
    """

    def __init__(self, backbone: Backbone, unit: int = MASK_UNIT):
        super().__init__()
        if not isinstance(backbone, TokenBackbone):
            raise TypeError(
                f"{backbone.name}: mask tokens need a backbone that splits at its patch tokens "
                "(SAM 2 Hiera or Swin); plain ViTs are not supported for PSST"
            )
        self.backbone = backbone
        self.unit = unit
        self.tokens_per_unit = unit // backbone.reductions[0]
        self.mask_token = nn.Parameter(torch.zeros(backbone.channels[0]))
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> list[Tensor]:
        tokens = self.backbone.embed_patches(x)
        if mask is not None:
            expected = (x.shape[-2] // self.unit, x.shape[-1] // self.unit)
            if tuple(mask.shape[-2:]) != expected:
                raise ValueError(f"mask grid {tuple(mask.shape[-2:])} does not match image units {expected}")
            per_token = mask.repeat_interleave(self.tokens_per_unit, 1).repeat_interleave(self.tokens_per_unit, 2)
            tokens = torch.where(per_token.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        return self.backbone.forward_tokens(self.backbone.add_pos_embed(tokens))
