"""Pictures of inputs, labels and predictions (numpy + Pillow; no plotting library needed).

Used by evaluation (a grid of test samples), prediction (one PNG per input) and the report.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.utils import draw_bounding_boxes

from pipeline.training.psst_data import Normalization

IGNORE_COLOUR = (0, 0, 0)


def colorize(label: np.ndarray, palette: Sequence[Sequence[int]], ignore_index: int | None = None) -> np.ndarray:
    """Class map (H, W) -> RGB (H, W, 3) uint8; ignored or out-of-palette pixels are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8)[:256]
    if ignore_index is not None and 0 <= ignore_index < 256:
        table[ignore_index] = IGNORE_COLOUR
    return table[np.clip(label, 0, 255).astype(np.uint8)]


def saliency_to_rgb(saliency: np.ndarray) -> np.ndarray:
    """Saliency or a binary mask in [0, 1] (H, W) -> grey RGB uint8."""
    grey = (np.clip(saliency, 0.0, 1.0) * 255).round().astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def draw_boxes(image: np.ndarray, boxes: Tensor, labels: Tensor, class_names: Sequence[str],
               palette: Sequence[Sequence[int]], scores: Tensor | None = None,
               crowd: Tensor | None = None) -> np.ndarray:
    """Boxes (N, 4) xyxy pixels drawn on an RGB uint8 image (H, W, 3) in their class colours and
    named (with the score when given); crowd (ignore) regions in grey. torchvision draws them."""
    names = [class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c)) for c in labels]
    if scores is not None:
        names = [f"{n} {float(s):.2f}" for n, s in zip(names, scores, strict=True)]
    colours = [tuple(int(v) for v in palette[int(c) % len(palette)]) for c in labels]
    if crowd is not None:
        colours = [(128, 128, 128) if bool(c) else colour for colour, c in zip(colours, crowd, strict=True)]
    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if len(boxes) == 0:
        return np.ascontiguousarray(image)
    drawn = draw_bounding_boxes(canvas, boxes.float().cpu(), labels=names, colors=colours, width=2)
    return drawn.permute(1, 2, 0).numpy()


def input_to_rgb(image: Tensor, normalization: Normalization) -> np.ndarray:
    """A normalised encoder input (3, H, W) back to a viewable RGB uint8 image."""
    mean = torch.tensor(normalization.mean, dtype=image.dtype)[:, None, None]
    std = torch.tensor(normalization.std, dtype=image.dtype)[:, None, None]
    return ((image.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def image_grid(rows: Sequence[Sequence[np.ndarray]], header: Sequence[str], row_labels: Sequence[str] = (),
               pad: int = 4, text_height: int = 14) -> Image.Image:
    """RGB uint8 tiles in a grid (each resized to the first tile's size), with column titles and
    optional row labels."""
    height, width = rows[0][0].shape[:2]
    label_width = 70 if row_labels else 0
    columns = max(len(row) for row in rows)
    canvas = Image.new("RGB", (label_width + columns * (width + pad) + pad,
                               text_height + len(rows) * (height + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for col, title in enumerate(header):
        draw.text((label_width + pad + col * (width + pad), 1), title, fill="black")
    for r, row in enumerate(rows):
        top = text_height + pad + r * (height + pad)
        if r < len(row_labels):
            draw.text((2, top + height // 2 - 6), row_labels[r], fill="black")
        for col, tile in enumerate(row):
            image = Image.fromarray(tile)
            if image.size != (width, height):
                image = image.resize((width, height), Image.NEAREST)
            canvas.paste(image, (label_width + pad + col * (width + pad), top))
    return canvas
