"""Prediction with a trained task: a folder of inputs in any reader's layout -> one output per sample.

Segmentation writes the class ids as an 8-bit PNG (`<key>.png`, the dataset's train ids) and a
palette-coloured preview (`<key>_color.png`); salient object detection writes the saliency map
as an 8-bit grey PNG; detection writes the boxes as JSON (`<key>.json`: xyxy pixels of the input
image, score, class id and name, every detection the model keeps) and the first stream with the
boxes scoring at least 0.3 drawn on it (`<key>_boxes.png`). Inputs are resized to the task's evaluation size (or their own size
rounded to a multiple of 32) and the output is resized back to the input's size. Unreadable or
incomplete samples are skipped and counted; the output folder appears only when complete.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from pipeline.artifacts import atomic_dir, write_json
from pipeline.data.loading import Resize, to_tensors
from pipeline.data.readers import build_reader
from pipeline.data.types import BOX_FIELDS, SampleError
from pipeline.training.task_data import DETECTION, SOD, TaskSample
from pipeline.training.tasks import FIGURE_MIN_SCORE, load_task_model, predict_logits, render_output, scored_outputs
from pipeline.visualize import draw_boxes, input_to_rgb

log = logging.getLogger(__name__)
MULTIPLE = 32


def inference_size(height: int, width: int, configured: Sequence[int] | None) -> tuple[int, int]:
    """The task's evaluation size, else the input's size rounded to the nearest multiple of 32."""
    if configured:
        return int(configured[0]), int(configured[1])
    return (max(MULTIPLE, round(height / MULTIPLE) * MULTIPLE), max(MULTIPLE, round(width / MULTIPLE) * MULTIPLE))


def predict_folder(model_dir: Path, reader_config: Mapping[str, Any], out_dir: Path,
                   splits: Sequence[str] | None = None, progress: bool = True) -> dict[str, Any]:
    """Predict every sample the reader lists (all its splits, or `splits`) into `out_dir`."""
    model, info, encoders = load_task_model(Path(model_dir))
    head, classes = info["config"]["head"], info["classes"]
    configured = info["config"]["eval"].get("image_size")
    reader = build_reader(dict(reader_config), where="predict input")
    missing = [m for e in encoders.values() for m in e.encoding.inputs if m not in reader.modalities]
    if missing:
        raise ValueError(f"the task needs {sorted(set(missing))} but reader {reader.name!r} gives {list(reader.modalities)}")
    records = [(split, r) for split in (splits or reader.splits()) for r in reader.records(split)]
    skipped: Counter[str] = Counter()
    written = 0
    with atomic_dir(out_dir) as tmp:
        for split, record in tqdm(records, desc="predict", unit="img", disable=not progress):
            try:
                sample = to_tensors(reader.load(record))
            except SampleError as err:
                skipped[err.reason] += 1
                log.warning("skipping %s: %s", record.key, err)
                continue
            height, width = next(v for k, v in sample.items() if k in encoders).shape[-2:]
            transform = TaskSample(encoders, head=head, geometry=Resize(inference_size(height, width, configured)))
            item = transform({k: v for k, v in sample.items() if k not in ("label", *BOX_FIELDS)})
            inputs = {s: item[s][None] for s in model.streams}
            if head == DETECTION:
                native = {"size": torch.tensor([height, width])}
                [(predicted, _)] = scored_outputs(model, inputs, [native], head=head)  # one sample
                detections = predicted[0]
                image = F.interpolate(item[model.streams[0]][None], size=(height, width), mode="bilinear",
                                      align_corners=False)[0]
                _write_detections(tmp, record.key, detections, input_to_rgb(image, encoders[model.streams[0]]
                                                                            .normalization), classes)
            else:
                logits = F.interpolate(predict_logits(model, inputs), size=(height, width), mode="bilinear",
                                       align_corners=False)[0]
                _write_prediction(tmp, record.key, logits, head, classes)
            written += 1
        summary = {"model": str(model_dir), "input": str(reader.root), "reader": reader.name, "written": written,
                   "skipped": dict(skipped), "head": head}
        write_json(tmp / "predictions.json", summary)
    return summary


def _write_detections(folder: Path, key: str, detections: Mapping[str, torch.Tensor], image: np.ndarray,
                      classes: Mapping[str, Any]) -> None:
    names = classes["names"]
    write_json(folder / f"{key}.json", {"key": key, "boxes_format": "xyxy pixels", "detections": [
        {"box": [round(float(v), 2) for v in box], "score": round(float(score), 4), "class_id": int(label),
         "class": names[int(label)]}
        for box, score, label in zip(detections["boxes"], detections["scores"], detections["labels"], strict=True)]})
    shown = detections["scores"] >= FIGURE_MIN_SCORE
    Image.fromarray(draw_boxes(image, detections["boxes"][shown], detections["labels"][shown], names,
                               classes["palette"], scores=detections["scores"][shown])).save(folder / f"{key}_boxes.png")


def _write_prediction(folder: Path, key: str, logits: torch.Tensor, head: str, classes: Mapping[str, Any]) -> None:
    if head == SOD:
        saliency = logits[0].sigmoid().cpu().numpy()
        Image.fromarray((saliency * 255).round().astype(np.uint8)).save(folder / f"{key}.png")
        return
    ids = logits.argmax(0).cpu().numpy().astype(np.uint8)
    Image.fromarray(ids).save(folder / f"{key}.png")
    Image.fromarray(render_output(ids, head, classes)).save(folder / f"{key}_color.png")
