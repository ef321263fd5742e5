"""Stage-2 inputs: a labeled dataset's shards -> one encoded, normalised image per stream + target.

Every method of a task reads exactly these tensors (same encodings, same normalisation, same
label subset, same crops for a given seed), so methods are compared on identical data. The
encoding of a non-RGB stream is resolved against the *task* dataset's own manifest and its
mean/std measured on the task's training split (each dataset normalised by its own
statistics); RGB uses the encoder's pretraining mean/std.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.loading import PairedAugment, Resize, TrainStream, eval_stream, train_stream
from pipeline.data.modalities import ModalityEncoding, build_encoding
from pipeline.data.types import BOX_CROWD, BOX_FIELDS, BOX_LABELS, BOXES, LABEL, RGB, Sample
from pipeline.training.psst_data import EncodeImage, Normalization, measure_normalization

SEGMENTATION, SOD, DETECTION = "segmentation", "sod", "detection"
HEADS = (SEGMENTATION, SOD, DETECTION)


def stream_encoding(stream: str, modalities: Mapping[str, Any], manifest: Mapping[str, Any]) -> ModalityEncoding:
    """RGB as is; another stream by its `modalities.<stream>` config against the task manifest."""
    if stream == RGB:
        return ModalityEncoding(RGB, [RGB], "rgb")
    if stream not in modalities:
        raise KeyError(f"stream {stream!r} has no entry under `modalities` in params.yaml")
    config = modalities[stream]
    stats = manifest["modalities"].get(config["inputs"][0])
    if stats is None:
        raise ValueError(f"stream {stream!r}: the task dataset's shards have no {config['inputs'][0]!r} images")
    return build_encoding(stream, config, stats)


def stream_encoders(streams: Sequence[str], modalities: Mapping[str, Any], manifest: Mapping[str, Any],
                    train_urls: Sequence[str], rgb_stats: tuple[Sequence[float], Sequence[float]],
                    normalization_images: int, progress: bool = True) -> dict[str, EncodeImage]:
    """One `EncodeImage` per stream; non-RGB mean/std measured on the training shards."""
    encoders = {}
    for stream in streams:
        encoding = stream_encoding(stream, modalities, manifest)
        if stream == RGB:
            normalization = Normalization(tuple(rgb_stats[0]), tuple(rgb_stats[1]))
        else:
            normalization = measure_normalization(train_urls, encoding, normalization_images, progress)
        encoders[stream] = EncodeImage(encoding, normalization)
    return encoders


def foreground_ids(names: Sequence[str | int], class_names: Sequence[str] | None) -> list[int]:
    """Class ids (given by name or id) that make up the salient foreground of an SOD target."""
    ids = []
    for name in names:
        if isinstance(name, int):
            ids.append(name)
        elif class_names is not None and name in class_names:
            ids.append(list(class_names).index(name))
        else:
            raise ValueError(f"foreground class {name!r} is not a class of the dataset ({class_names})")
    return ids


class TaskSample:
    """Raw sample -> {"key", "meta", <stream>: (3, H, W) float, "target": (H, W) int64,
    "full_target": the target at the sample's original size}.

    `geometry` (a paired crop/flip or a resize) runs once on the raw sample, so every stream
    and the label (or the boxes) move together. SOD targets are 1 on `foreground` classes, 0
    elsewhere. Detection targets are {"boxes" (N, 4) xyxy pixels, "labels", "crowd"}, and the
    full target adds "size" (the original H, W) to map predictions back to the native image.
    """

    def __init__(self, encoders: Mapping[str, EncodeImage], *, head: str, geometry: PairedAugment | Resize | None,
                 foreground: Sequence[int] = ()):
        if head not in HEADS:
            raise ValueError(f"head {head!r} is not one of {', '.join(HEADS)}")
        self.encoders = dict(encoders)
        self.head = head
        self.geometry = geometry
        self.foreground = torch.tensor(list(foreground), dtype=torch.int64)

    @property
    def target_members(self) -> list[str]:
        """The sample entries a labelled sample of this head has."""
        return list(BOX_FIELDS) if self.head == DETECTION else [LABEL]

    def __call__(self, sample: Sample) -> dict[str, Any]:
        labeled = all(name in sample for name in self.target_members)  # unlabeled inputs (prediction): no targets
        full_target = self._target(sample) if labeled else None  # before any resize
        if self.geometry is not None:
            sample = self.geometry(sample)
        out = {"key": sample["key"], "meta": sample.get("meta", {})}
        for stream, encode in self.encoders.items():
            out[stream] = encode(sample)["image"]
        if labeled:
            out["target"] = self._target(sample)
            out["full_target"] = full_target
        return out

    def _target(self, sample: Sample) -> Tensor | dict[str, Tensor]:
        if self.head == DETECTION:
            boxes = sample[BOXES]
            return {"boxes": boxes.as_subclass(Tensor).float(), "labels": sample[BOX_LABELS].long(),
                    "crowd": sample[BOX_CROWD].bool(), "size": torch.tensor(boxes.canvas_size)}
        target = torch.as_tensor(sample[LABEL]).long()
        return torch.isin(target, self.foreground).long() if self.head == SOD else target


def label_subset(keys: Sequence[str], fraction: float, seed: int) -> list[str]:
    """A seeded `fraction` of the training keys (at least one): the label budget."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"label_fraction must be in (0, 1], got {fraction}")
    keys = sorted(keys)
    count = max(1, round(fraction * len(keys)))
    chosen = np.random.default_rng(seed).choice(len(keys), size=count, replace=False)
    return sorted(keys[i] for i in chosen)


def task_train_stream(urls: Sequence[str], transform: TaskSample, *, keys: Sequence[str], epoch_samples: int,
                      seed: int) -> TrainStream:
    return train_stream(urls, epoch_samples=epoch_samples, seed=seed, keys=keys, transform=transform,
                        required=[*_required(transform), *transform.target_members])


def task_eval_stream(urls: Sequence[str], transform: TaskSample) -> IterableDataset:
    return eval_stream(urls, transform=transform, required=[*_required(transform), *transform.target_members])


def _required(transform: TaskSample) -> list[str]:
    return sorted({name for encode in transform.encoders.values() for name in encode.encoding.inputs})


def collate_task(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack inputs and targets; full-resolution targets and box targets stay lists (their sizes
    and box counts differ)."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "meta": [s["meta"] for s in samples]}
    for name, value in samples[0].items():
        if name == "full_target" or isinstance(value, dict):
            batch[name] = [s[name] for s in samples]
        elif isinstance(value, Tensor):
            batch[name] = torch.stack([s[name] for s in samples])
    return batch


def task_loader(stream: IterableDataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_task,
                      pin_memory=torch.cuda.is_available())


def sample_group(meta: Mapping[str, Any], key: str, pattern: str | None) -> str | None:
    """The evaluation group of a sample (e.g. its lighting condition), from the first match of
    `pattern`'s `group` (or first) capture in the sample's file name (`meta.name`) or key."""
    if not pattern:
        return None
    match = re.search(pattern, str(meta.get("name", key)))
    if match is None:
        return None
    return match.group("group") if "group" in match.groupdict() else match.group(1)
