"""Box-label readers: YOLO text and Pascal-VOC XML parsing, seeded stratified splits, and the
Ultralytics, VOC, M3FD, MSRS-detection and HIT-UAV layouts (small trees in the real layouts, and
the shared real data)."""

from __future__ import annotations

import collections
import re

import numpy as np
import pytest
import yaml
from PIL import Image

from pipeline.data.readers import build_reader
from pipeline.data.readers.boxes import read_voc_boxes, read_yolo_boxes, seeded_splits
from pipeline.data.types import BOX_CROWD, BOX_LABELS, BOXES, SampleError


def write_image(path, array) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_yolo_text_boxes_and_errors(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("1 0.5 0.5 0.25 0.5\n\n0 0.05 0.1 0.2 0.2\n")
    boxes = read_yolo_boxes(path, (40, 80), num_classes=2)
    np.testing.assert_allclose(boxes[BOXES], [[30, 10, 50, 30], [0, 0, 12, 8]])  # second clipped at 0
    assert boxes[BOX_LABELS].tolist() == [1, 0] and boxes[BOX_CROWD].tolist() == [0, 0]
    assert read_yolo_boxes(None, (40, 80), 2)[BOXES].shape == (0, 4)  # no file: background
    path.write_text("2 0.5 0.5 0.1 0.1\n")
    with pytest.raises(SampleError, match=r"a.txt:1: class 2 is not in 0..1"):
        read_yolo_boxes(path, (40, 80), 2)
    path.write_text("0 0.5 0.5\n")
    with pytest.raises(SampleError, match=r"a.txt:1: not `class cx cy w h`"):
        read_yolo_boxes(path, (40, 80), 2)


VOC_XML = """<annotation><size><width>80</width><height>40</height><depth>1</depth></size>
<object><name>Car</name><difficult>0</difficult><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>10</xmax><ymax>20</ymax></bndbox></object>
<object><name>Person</name><difficult>1</difficult><bndbox><xmin>31</xmin><ymin>5</ymin><xmax>40</xmax><ymax>9</ymax></bndbox></object>
<object><name>DontCare</name><bndbox><xmin>61</xmin><ymin>21</ymin><xmax>90</xmax><ymax>40</ymax></bndbox></object>
</annotation>"""


def test_voc_boxes_are_zero_based_with_difficult_and_ignore_regions_as_crowd(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(VOC_XML)
    boxes = read_voc_boxes(path, (40, 80), ("Person", "Car"), ignore_names=("DontCare",))
    # VOC's 1-based inclusive pixels -> 0-based half-open; DontCare once per class, clipped to the image
    np.testing.assert_allclose(boxes[BOXES], [[0, 0, 10, 20], [30, 4, 40, 9], [60, 20, 80, 40], [60, 20, 80, 40]])
    assert boxes[BOX_LABELS].tolist() == [1, 0, 0, 1]
    assert boxes[BOX_CROWD].tolist() == [0, 1, 1, 1]
    with pytest.raises(SampleError, match=r"class 'DontCare' is not one of \['Person', 'Car'\]"):
        read_voc_boxes(path, (40, 80), ("Person", "Car"))
    path.write_text("<annotation><object>")
    with pytest.raises(SampleError, match="cannot parse VOC XML"):
        read_voc_boxes(path, (40, 80), ("Person",))


def test_seeded_splits_are_stratified_reproducible_and_complete():
    names = [f"{i:05d}{'D' if i % 3 else 'N'}" for i in range(90)]  # 60 day, 30 night
    splits = seeded_splits(names, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=3, group=lambda n: n[-1])
    assert splits == seeded_splits(list(reversed(names)), {"train": 0.6, "val": 0.2, "test": 0.2}, 3,
                                   group=lambda n: n[-1])
    assert sorted(sum(splits.values(), [])) == sorted(names)
    assert {s: collections.Counter(n[-1] for n in v) for s, v in splits.items()} == {
        "train": {"D": 36, "N": 18}, "val": {"D": 12, "N": 6}, "test": {"D": 12, "N": 6}}
    assert splits != seeded_splits(names, {"train": 0.6, "val": 0.2, "test": 0.2}, 4, group=lambda n: n[-1])
    with pytest.raises(ValueError, match="sum to 1"):
        seeded_splits(names, {"train": 0.6, "test": 0.2}, 0)


def test_ultralytics_layout(tmp_path):
    grey = np.full((40, 80), 7, np.uint8)
    write_image(tmp_path / "images" / "train" / "a.jpg", np.stack([grey] * 3, axis=2))
    write_image(tmp_path / "images" / "train" / "b.png", np.stack([grey] * 3, axis=2))
    write_image(tmp_path / "images" / "val" / "c.png", np.stack([grey] * 3, axis=2))
    (tmp_path / "labels" / "train").mkdir(parents=True)
    (tmp_path / "labels" / "train" / "a.txt").write_text("1 0.5 0.5 0.25 0.5\n")
    (tmp_path / "data.yaml").write_text("names: {0: person, 1: car}\n")
    reader = build_reader({"reader": "yolo", "root": str(tmp_path)})
    assert reader.splits() == ["train", "val"] and reader.class_names == ("person", "car")
    a, b = (reader.load(r) for r in reader.records("train"))
    np.testing.assert_allclose(a[BOXES], [[30, 10, 50, 30]])
    assert a["rgb"].shape == (40, 80, 3) and b[BOXES].shape == (0, 4)  # b has no label file: background


def test_voc_layout_with_split_lists_and_m3fd_layout(tmp_path):
    voc = tmp_path / "voc"
    write_image(voc / "JPEGImages" / "x1.jpg", np.zeros((40, 80, 3), np.uint8))
    write_image(voc / "JPEGImages" / "x2.jpg", np.zeros((40, 80, 3), np.uint8))
    (voc / "Annotations").mkdir()
    (voc / "Annotations" / "x1.xml").write_text(VOC_XML)
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "trainval.txt").write_text("x1\nx2\n")
    reader = build_reader({"reader": "voc", "root": str(voc), "class_names": ["Person", "Car"],
                           "ignore_names": ["DontCare"]})
    assert reader.splits() == ["trainval"]
    x1, x2 = reader.records("trainval")
    assert reader.load(x1)[BOX_LABELS].tolist() == [1, 0, 0, 1]
    with pytest.raises(SampleError, match="no box-label file"):
        reader.load(x2)
    with pytest.raises(ValueError, match="no split lists; give `splits` fractions"):
        build_reader({"reader": "voc", "root": str(voc), "class_names": ["Person"], "split_dir": "none"}).splits()

    m3fd = tmp_path / "M3FD_Detection"
    for i in range(5):
        write_image(m3fd / "Vis" / f"{i:05d}.png", np.zeros((40, 80, 3), np.uint8))
        write_image(m3fd / "Ir" / f"{i:05d}.png", np.full((40, 80), 9, np.uint8))
        (m3fd / "Annotation").mkdir(exist_ok=True)
        (m3fd / "Annotation" / f"{i:05d}.xml").write_text(VOC_XML.replace("DontCare", "Truck").replace("Car", "Bus")
                                                          .replace("Person", "People"))
    reader = build_reader({"reader": "m3fd", "root": str(m3fd)})
    assert {s: len(reader.records(s)) for s in reader.splits()} == {"train": 4, "test": 1}
    sample = reader.load(reader.records("train")[0])
    assert sample["rgb"].shape == (40, 80, 3) and sample["thermal"].shape == (40, 80)
    assert [reader.class_names[c] for c in sample[BOX_LABELS]] == ["Bus", "People", "Truck"]
    assert sample[BOX_CROWD].tolist() == [0, 1, 0]  # VOC `difficult`


def test_msrs_detection_labels_on_the_shared_data(shared_data):
    root = shared_data / "msrs_rgbt_det"
    reader = build_reader({"reader": "msrs_det", "root": str(root)})
    assert reader.class_names == ("person", "bicycle", "car")
    records = {s: reader.records(s) for s in reader.splits()}
    assert {s: collections.Counter(r.key[-1] for r in v) for s, v in records.items()} == {
        "train": {"D": 72, "N": 72}, "val": {"D": 24, "N": 24}, "test": {"D": 24, "N": 24}}
    assert records == {s: build_reader({"reader": "msrs_det", "root": str(root)}).records(s) for s in records}
    lines = 0
    for record in records["test"]:
        sample = reader.load(record)
        assert sample["rgb"].shape == (480, 640, 3) and sample["thermal"].shape == (480, 640)
        assert sample["meta"]["condition"] == {"D": "day", "N": "night"}[record.key[-1]]
        text = (root / "labels" / "fusion" / f"{sample['meta']['name']}.txt").read_text().split("\n")
        rows = [line.split() for line in text if line.strip()]
        lines += len(rows)
        assert len(sample[BOXES]) == len(rows)  # every labelled box survives clipping
        assert sample[BOX_LABELS].tolist() == [int(r[0]) for r in rows]
        centres = np.array([[float(r[1]) * 640, float(r[2]) * 480] for r in rows]).reshape(-1, 2)
        inside = (centres > 1) & (centres < [639, 479])  # boxes centred inside are not moved by clipping
        got = (sample[BOXES][:, :2] + sample[BOXES][:, 2:]) / 2
        np.testing.assert_allclose(got[inside.all(1)], centres[inside.all(1)], atol=0.5)
    assert lines > 100


def test_hit_uav_on_the_shared_data(shared_data):
    root = shared_data / "hit_uav"
    reader = build_reader({"reader": "hit_uav", "root": str(root), "image_dir": "images",
                           "annotation_dir": "annotations", "splits": {"train": 0.8, "test": 0.2},
                           "group_pattern": "^(?P<group>[01])_"})
    assert {s: len(reader.records(s)) for s in reader.splits()} == {"train": 960, "test": 240}
    test = reader.records("test")
    assert collections.Counter(r.key.split("__")[1][0] for r in test) == {"1": 164, "0": 76}  # 821 / 379 stratified
    objects = crowd = 0
    for record in test[:40]:
        sample = reader.load(record)
        assert sample["thermal"].ndim == 2 and sample["thermal"].dtype == np.uint8  # grey JPEG as HxW
        xml = (root / "annotations" / f"{sample['meta']['name']}.xml").read_text()
        names = re.findall(r"<name>([^<]*)</name>", xml)
        assert len(sample[BOXES]) == len(names) + 3 * names.count("DontCare")  # DontCare: one per class
        objects += len(names)
        crowd += int(sample[BOX_CROWD].sum())
    assert objects > 100


def test_the_detection_presets_read_the_shared_data(shared_data):
    """experiment=msrs_det / hit_uav_det: their datasets, and the real thermal pool of three
    releases (MSRS's val / test pairs stay out of it), read the team's copies."""
    from pipeline.config import compose_params
    from tests.conftest import REPO

    msrs = yaml.safe_load(compose_params(["experiment=msrs_det"], REPO / "conf"))["datasets"]
    pool = build_reader({**msrs["thermal_pool_real"], "root": str(shared_data)})
    records = pool.records("unlabeled")
    parts = collections.Counter(r.meta["part"] for r in records)
    assert parts == {"hit_uav": 1200, "roadscene": 222, "msrs": 144}  # RoadScene's visible/Thumbs.db is listed...
    with pytest.raises(SampleError, match="Thumbs.db: not an image file"):
        pool.load(next(r for r in records if r.meta["name"] == "Thumbs.db"))  # ...and skipped when sharded
    detection = build_reader({**msrs["msrs_det"], "root": str(shared_data / "msrs_rgbt_det")})
    train = {r.meta["name"] for r in detection.records("train")}
    assert {r.meta["name"] for r in records if r.meta["part"] == "msrs"} == train  # the same split
    sample = pool.load(next(r for r in records if r.meta["part"] == "roadscene"))
    assert set(sample) == {"key", "meta", "thermal"} and sample["thermal"].ndim == 2

    hit = yaml.safe_load(compose_params(["experiment=hit_uav_det"], REPO / "conf"))["datasets"]["hit_uav_det"]
    reader = build_reader({**hit, "root": str(shared_data / "hit_uav")})
    assert {s: len(reader.records(s)) for s in reader.splits()} == {"train": 840, "val": 120, "test": 240}
