"""Boxes through shards and the paired geometry: flips, resizes and crops move boxes with the
pixels, boxes cut away are dropped with their labels and crowd flags."""

from __future__ import annotations

import collections

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from pipeline.data.loading import PairedAugment, Resize, eval_stream, sanitize_boxes, shard_urls, to_tensors
from pipeline.data.readers import build_reader
from pipeline.data.sharding import shard_dataset
from pipeline.data.types import BOX_CROWD, BOX_LABELS, BOXES, LABEL

# three rectangles (x1, y1, x2, y2) in a 60 x 80 (H x W) image, half-open pixel extents
RECTS = np.array([[4, 6, 20, 30], [30, 10, 70, 24], [50, 36, 76, 58]], dtype=np.float32)


def drawn_sample() -> dict:
    """An image and a label map with rectangle k filled with id k + 1, and its boxes."""
    label = np.zeros((60, 80), dtype=np.uint8)
    for k, (x1, y1, x2, y2) in enumerate(RECTS.astype(int)):
        label[y1:y2, x1:x2] = k + 1
    rgb = np.repeat((label * 60)[..., None], 3, axis=2).astype(np.uint8)
    return to_tensors({"key": "k", "rgb": rgb, LABEL: label, BOXES: RECTS.copy(),
                       BOX_LABELS: np.array([0, 1, 2]), BOX_CROWD: np.array([0, 0, 1], dtype=np.uint8)})


def extents(label: torch.Tensor, k: int) -> list[float]:
    """The half-open pixel extents (x1, y1, x2, y2) of id k in a label map."""
    ys, xs = torch.nonzero(torch.as_tensor(label) == k, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]


def assert_boxes_follow_pixels(sample: dict, tolerance: float) -> None:
    for box, cls in zip(sample[BOXES].tolist(), sample[BOX_LABELS].tolist(), strict=True):
        np.testing.assert_allclose(box, extents(sample[LABEL], cls + 1), atol=tolerance)


def test_flipped_boxes_match_the_flipped_pixels():
    flipped = sanitize_boxes(v2.RandomHorizontalFlip(1.0)(drawn_sample()))
    assert_boxes_follow_pixels(flipped, tolerance=0)
    assert flipped[BOXES][0].tolist() == [80 - 20, 6, 80 - 4, 30]


def test_resized_boxes_match_the_resized_pixels():
    resized = Resize((30, 160))(drawn_sample())  # x2 in width, /2 in height
    assert resized[BOXES].canvas_size == (30, 160)
    torch.testing.assert_close(resized[BOXES], torch.as_tensor(RECTS) * torch.tensor([2.0, 0.5, 2.0, 0.5]))
    assert_boxes_follow_pixels(resized, tolerance=1)  # nearest-neighbour label: within a pixel


def test_cropped_boxes_are_clipped_and_boxes_cut_away_are_dropped():
    window = {"top": 0, "left": 40, "height": 30, "width": 40}
    cropped = sanitize_boxes({name: v2.functional.crop(value, **window) if name in (BOXES, LABEL, "rgb") else value
                              for name, value in drawn_sample().items()})
    # rectangle 0 (x 4-20) lies left of the window and rectangle 2 (y 36-58) below it: dropped,
    # with their labels and crowd flags; rectangle 1 (x 30-70) is clipped to the window
    assert cropped[BOX_LABELS].tolist() == [1] and cropped[BOX_CROWD].tolist() == [False]
    assert cropped[BOXES].tolist() == [[0, 10, 30, 24]]
    assert_boxes_follow_pixels(cropped, tolerance=0)


def test_paired_augment_moves_boxes_with_pixels_over_many_draws():
    torch.manual_seed(0)
    augment = PairedAugment((48, 64), scale=(0.2, 1.0))
    counts = collections.Counter()
    for _ in range(40):
        out = augment(drawn_sample())
        counts[len(out[BOX_LABELS])] += 1
        assert len(out[BOXES]) == len(out[BOX_LABELS]) == len(out[BOX_CROWD])
        assert out[BOXES].canvas_size == (48, 64)
        # bilinear resize of a hard edge moves it by at most a pixel; the label map is nearest
        assert_boxes_follow_pixels(out, tolerance=1.5)
        crowd = dict(zip(out[BOX_LABELS].tolist(), out[BOX_CROWD].tolist(), strict=True))
        assert crowd.get(2, True) is True and crowd.get(0, False) is False  # flags stay with their boxes
    assert counts[3] and sum(n for k, n in counts.items() if k < 3)  # some draws cut boxes away


def test_shards_keep_boxes_exactly_and_count_them(tmp_path):
    from tests.readers.test_box_readers import VOC_XML  # one XML with difficult and DontCare objects

    root = tmp_path / "voc"
    rng = np.random.default_rng(0)
    for i in range(3):
        (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 80, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"x{i}.png")
        (root / "Annotations").mkdir(exist_ok=True)
        (root / "Annotations" / f"x{i}.xml").write_text(VOC_XML if i else VOC_XML.split("<object>")[0] +
                                                        "</annotation>")  # x0: no object
    reader = build_reader({"reader": "voc", "root": str(root), "class_names": ["Person", "Car"],
                           "ignore_names": ["DontCare"], "splits": {"train": 1.0}})
    manifest = shard_dataset(reader, tmp_path / "shards", name="voc", progress=False)
    assert manifest["splits"]["train"]["boxes"] == {"0": 0, "1": 2, "crowd": 6}  # 2 x (difficult + 2 DontCare)
    read = {s["key"]: s for s in eval_stream(shard_urls(tmp_path / "shards", "train"))}
    for record in reader.records("train"):
        expected = reader.load(record)
        got = read[record.key]
        assert got[BOXES].canvas_size == (40, 80)
        torch.testing.assert_close(got[BOXES].as_subclass(torch.Tensor), torch.from_numpy(expected[BOXES]))
        assert got[BOX_LABELS].tolist() == expected[BOX_LABELS].tolist()
        assert got[BOX_CROWD].tolist() == expected[BOX_CROWD].astype(bool).tolist()
    assert len(read["train__x0"][BOXES]) == 0
