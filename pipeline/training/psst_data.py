"""PSST inputs: one modality's unlabeled shards, augmented, encoded to 3 channels, normalised.

Geometric augmentation runs on the raw values (uint16 thermal counts, depth millimetres) and
the modality encoding after it, so precision is kept until the encoding. Normalisation uses the
mean/std of the *encoded* modality, measured on its own shards: an encoded thermal image then
enters the RGB encoder with the same first moments a normalised RGB image has.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset
from tqdm.auto import tqdm

from pipeline.data.loading import PairedAugment, Resize, TrainStream, collate, eval_stream, train_stream
from pipeline.data.modalities import ModalityEncoding
from pipeline.data.types import Sample


@dataclass(frozen=True)
class Normalization:
    """Per-channel mean and std of the encoded modality."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Tensor) -> Tensor:
        mean = torch.tensor(self.mean, dtype=image.dtype)[:, None, None]
        std = torch.tensor(self.std, dtype=image.dtype)[:, None, None]
        return (image - mean) / std

    def to_dict(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}


class EncodeImage:
    """Raw sample -> {"key", "image"}: the modality encoding, then normalisation."""

    def __init__(self, encoding: ModalityEncoding, normalization: Normalization | None = None):
        self.encoding = encoding
        self.normalization = normalization

    def __call__(self, sample: Sample) -> dict[str, Any]:
        image = self.encoding(sample).float()
        if self.normalization is not None:
            image = self.normalization(image)
        return {"key": sample["key"], "image": image}


class AugmentThenEncode:
    """One random crop/flip of the raw sample, then `EncodeImage`."""

    def __init__(self, augment: PairedAugment | Resize, encode: EncodeImage):
        self.augment = augment
        self.encode = encode

    def __call__(self, sample: Sample) -> dict[str, Any]:
        return self.encode(self.augment(sample))


class MultiCrop:
    """DINO multi-crop: `global_crops` large and `local_crops` small views of one raw sample,
    each cropped, flipped and encoded independently -> {"key", "global", "local"}."""

    def __init__(
        self, encode: EncodeImage, *, global_size: Sequence[int], local_size: Sequence[int],
        global_crops: int = 2, local_crops: int = 4, global_scale: Sequence[float] = (0.4, 1.0),
        local_scale: Sequence[float] = (0.05, 0.4),
    ):
        self.encode = encode
        self.global_view = PairedAugment(global_size, scale=global_scale)
        self.local_view = PairedAugment(local_size, scale=local_scale)
        self.global_crops, self.local_crops = global_crops, local_crops

    def __call__(self, sample: Sample) -> dict[str, Any]:
        views = {
            "global": [self.encode(self.global_view(sample))["image"] for _ in range(self.global_crops)],
            "local": [self.encode(self.local_view(sample))["image"] for _ in range(self.local_crops)],
        }
        out: dict[str, Any] = {"key": sample["key"]}
        for name, images in views.items():
            if images:
                out[name] = torch.stack(images)
        return out


def measure_normalization(urls: Sequence[str], encoding: ModalityEncoding, max_images: int = 256,
                          progress: bool = True) -> Normalization:
    """Mean/std per channel of the encoded modality over the first `max_images` samples."""
    total = sq = None
    pixels = 0
    stream = eval_stream(urls, transform=EncodeImage(encoding), required=encoding.inputs)
    for item in tqdm(islice(stream, max_images), desc="normalisation stats", total=max_images,
                     disable=not progress, leave=False):
        image = item["image"].double().flatten(1)
        total = image.sum(1) if total is None else total + image.sum(1)
        sq = (image**2).sum(1) if sq is None else sq + (image**2).sum(1)
        pixels += image.shape[1]
    if total is None:
        raise ValueError(f"no samples with {encoding.inputs} in {urls[0]}...: cannot measure normalisation")
    mean = total / pixels
    std = (sq / pixels - mean**2).clamp_min(1e-12).sqrt()
    return Normalization(tuple(round(v, 6) for v in mean.tolist()), tuple(round(max(v, 1e-3), 6) for v in std.tolist()))


def augmented_stream(urls: Sequence[str], encode: EncodeImage, *, image_size: Sequence[int],
                     epoch_samples: int, scale: Sequence[float] = (0.5, 1.0), seed: int = 0) -> TrainStream:
    """Warm-up stream: random resized crop + flip at `image_size`, then encode."""
    return train_stream(urls, epoch_samples=epoch_samples, seed=seed, required=encode.encoding.inputs,
                        transform=AugmentThenEncode(PairedAugment(image_size, scale=scale), encode))


def multicrop_stream(urls: Sequence[str], multicrop: MultiCrop, *, epoch_samples: int,
                     keys: Collection[str] | None = None, seed: int = 0) -> TrainStream:
    """Joint-phase stream over the selected `keys` only."""
    return train_stream(urls, epoch_samples=epoch_samples, seed=seed, keys=keys,
                        required=multicrop.encode.encoding.inputs, transform=multicrop)


def scoring_stream(urls: Sequence[str], encode: EncodeImage, *, image_size: Sequence[int]) -> IterableDataset:
    """Every sample once, resized to `image_size`, for subset scoring."""
    return eval_stream(urls, transform=AugmentThenEncode(Resize(image_size), encode), required=encode.encoding.inputs)


def loader(stream: IterableDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate,
                      persistent_workers=False, pin_memory=torch.cuda.is_available())
