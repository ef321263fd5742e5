"""The reader interface and registry: one reader class per native dataset layout.

A reader lists `Record`s per split (paths only, sorted by key) and loads one record into a
`Sample`. Class names, ignore index and palette live with the reader, because they are facts
about the dataset's release, not about a task.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from pipeline.data.image_io import READABLE_SUFFIXES, read_image
from pipeline.data.types import (
    LABEL,
    RGB,
    Record,
    Sample,
    SampleError,
    check_same_size,
    sample_key,
)

READERS: dict[str, type[DatasetReader]] = {}


def register_reader(name: str):
    """Class decorator: make a reader available as `reader: <name>` in dataset configs."""

    def decorate(cls: type[DatasetReader]) -> type[DatasetReader]:
        if name in READERS:
            raise ValueError(f"reader {name!r} registered twice")
        cls.name = name
        READERS[name] = cls
        return cls

    return decorate


def build_reader(config: Mapping[str, Any], where: str = "dataset") -> DatasetReader:
    """Build a reader from a dataset config `{reader: <name>, root: <dir>, **options}`.

    `where` names the config key in error messages (e.g. `datasets.mfnet`).
    """
    options = dict(config)
    name = options.pop("reader", None)
    if name not in READERS:
        raise ValueError(
            f"{where}.reader: unknown reader {name!r}; available: {', '.join(sorted(READERS))}"
        )
    cls = READERS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"{where}: option(s) {unknown} not accepted by reader {name!r}; "
            f"accepted: {sorted(accepted)}"
        )
    return cls(**options)


class DatasetReader(ABC):
    """Base class of all layouts. Subclasses set `modalities` and implement `splits`/`records`."""

    name: ClassVar[str] = ""
    modalities: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None
    ignore_index: int | None = None
    palette: tuple[tuple[int, int, int], ...] | None = None
    box_class_names: tuple[str, ...] | None = None  # detection classes, when the layout has boxes

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist ({self.name} reader)")

    @abstractmethod
    def splits(self) -> list[str]:
        """The split names present under `root`."""

    @abstractmethod
    def records(self, split: str) -> list[Record]:
        """All records of a split, sorted by key."""

    def load(self, record: Record) -> Sample:
        """Decode every file of a record; sources are named by modality (or `label`)."""
        sample: Sample = {"key": record.key, "meta": dict(record.meta)}
        for source, path in record.files.items():
            sample[source] = read_image(path)
        return self.finish(sample, record)

    def finish(self, sample: Sample, record: Record) -> Sample:
        """Shared checks after decoding: all modalities present, RGB as uint8 HxWx3,
        label as a 2-D map in train ids, equal sizes."""
        missing = [m for m in self.modalities if m not in sample]
        if missing:
            raise SampleError(
                "missing_modality", f"{record.key}: no {', '.join(missing)} file", _first(record)
            )
        if RGB in sample:
            sample[RGB] = to_rgb(sample[RGB], record.files.get(RGB))
        if LABEL in sample:
            label = sample[LABEL]
            if label.ndim == 3:  # labels saved as RGB-identical grey images
                label = label[..., 0]
            sample[LABEL] = self.convert_label(label)
        check_same_size(sample, record)
        return sample

    def convert_label(self, label: np.ndarray) -> np.ndarray:
        """Map the release's label values to train ids (ignore_index for unlabeled)."""
        return label

    def info(self) -> dict[str, Any]:
        """Facts written into the shard manifest."""
        return {
            "reader": self.name,
            "root": str(self.root),
            "modalities": list(self.modalities),
            "class_names": list(self.class_names) if self.class_names else None,
            "ignore_index": self.ignore_index,
            "palette": [list(c) for c in self.palette] if self.palette else None,
            "box_class_names": list(self.box_class_names) if self.box_class_names else None,
        }


def _first(record: Record) -> Path | None:
    return next(iter(record.files.values()), None)


def to_rgb(image: np.ndarray, path: Path | None = None) -> np.ndarray:
    """RGB as uint8 HxWx3: greyscale is replicated, an alpha channel dropped."""
    if image.dtype != np.uint8:
        raise SampleError("unsupported", f"{path}: RGB image must be 8-bit, got {image.dtype}", path)
    if image.ndim == 2:
        return np.repeat(image[..., None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] in (3, 4):
        return np.ascontiguousarray(image[..., :3])
    raise SampleError("unsupported", f"{path}: RGB image has shape {image.shape}", path)


def remap_labels(label: np.ndarray, mapping: Mapping[int, int], ignore_index: int) -> np.ndarray:
    """Look-up-table remap of label values; values not in `mapping` become `ignore_index`."""
    size = max(int(label.max(initial=0)), max(mapping, default=0)) + 1
    lut = np.full(size, ignore_index, dtype=np.int64)
    for source, target in mapping.items():
        lut[source] = target
    out = lut[label]
    return out.astype(np.uint8 if lut.max() < 256 else np.uint16)


def index_by_stem(folder: Path, recursive: bool = False) -> dict[str, Path]:
    """Map file stem -> path for the files in a folder (relative stem when recursive).

    Files with a non-image suffix are indexed by their full name, so the reader turns them
    into records that are then skipped as `not_an_image` instead of disappearing silently.
    """
    if not folder.is_dir():
        return {}
    files = folder.rglob("*") if recursive else folder.iterdir()
    index: dict[str, Path] = {}
    for path in sorted(p for p in files if p.is_file()):
        rel = path.relative_to(folder)
        stem = rel.with_suffix("") if path.suffix.lower() in READABLE_SUFFIXES else rel
        index[stem.as_posix()] = path
    return index


def read_split_list(path: Path) -> list[str]:
    """Names listed one per line in a split file (blank lines ignored)."""
    if not path.is_file():
        raise FileNotFoundError(f"split list {path} does not exist")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def sorted_records(records: Iterable[Record]) -> list[Record]:
    out = sorted(records, key=lambda r: r.key)
    keys = [r.key for r in out]
    if len(set(keys)) != len(keys):
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"duplicate sample keys {dupes[:5]}: file names collide after key cleaning")
    return out


# --- Helpers shared by the readers of public releases (mfnet, pst900, nyu_depth_v2, ...) ---

_LIST_SUFFIXES = frozenset(READABLE_SUFFIXES)


def read_split_names(path: Path) -> list[str]:
    """Sample names of a split list whose lines are bare names (`00001D`, CMX style) or paths
    (`RGB/12.jpg`, DFormer style): the file name without an image suffix, so both work."""
    names = []
    for line in read_split_list(path):
        name = line.split()[0].replace("\\", "/").rsplit("/", 1)[-1]
        stem, dot, suffix = name.rpartition(".")
        names.append(stem if dot and f".{suffix.lower()}" in _LIST_SUFFIXES else name)
    return names


def select_modalities(requested: Iterable[str], allowed: Iterable[str], reader: str) -> tuple[str, ...]:
    """Validate a reader's `modalities` option against what the release provides."""
    requested, allowed = tuple(requested), tuple(allowed)
    unknown = [m for m in requested if m not in allowed]
    if unknown:
        raise ValueError(f"{reader}: modalities {unknown} not in this release; choose from {list(allowed)}")
    return requested


def files_for(name: str, indices: Mapping[str, Mapping[str, Path]]) -> dict[str, Path]:
    """The file of each source whose index holds `name`; absent sources are left out so that
    loading reports them as `missing_modality`."""
    return {source: index[name] for source, index in indices.items() if name in index}


def listed_records(
    split: str,
    names: Iterable[str],
    folders: Mapping[str, Path],
    meta: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Record]:
    """Records for names taken from a split list, files matched by stem in one folder per source."""
    indices = {source: index_by_stem(folder) for source, folder in folders.items()}
    return sorted_records(
        Record(
            key=sample_key(split, name),
            files=files_for(name, indices),
            meta={"split": split, "name": name, **dict((meta or {}).get(name, {}))},
        )
        for name in names
    )


def squeeze_grey(image: np.ndarray) -> np.ndarray:
    """HxW for a single-channel image stored as identical colour channels (grey JPEG/PNG
    thermal); anything else is returned as stored. Exact equality only: nothing is lost."""
    if image.ndim == 3 and (image.shape[2] == 1 or (image.shape[2] == 3 and (image == image[..., :1]).all())):
        return np.ascontiguousarray(image[..., 0])
    return image


def voc_palette(count: int, start: int = 1) -> tuple[tuple[int, int, int], ...]:
    """PASCAL-VOC bit-interleaved colours for ids start..start+count-1: the colour map CMX and
    DFormer draw NYUv2/SUN RGB-D labels with (release id k = train id k-1, hence start=1)."""
    colours = []
    for index in range(start, start + count):
        r = g = b = 0
        value = index
        for bit in range(8):
            r |= ((value >> 0) & 1) << (7 - bit)
            g |= ((value >> 1) & 1) << (7 - bit)
            b |= ((value >> 2) & 1) << (7 - bit)
            value >>= 3
        colours.append((r, g, b))
    return tuple(colours)


class ReleaseReader(DatasetReader):
    """Base of the readers of published datasets.

    Adds what `DatasetReader.load` leaves open: a record of a labelled release without its
    label file is skipped as `missing_modality` (the base checks input modalities only), and
    `decode` is the one hook to override when a file holds several modalities or needs decoding.
    """

    has_labels: bool = True
    # Release id of train id 0: 1 where the release keeps 0 for "unlabeled" (NYUv2, SUN RGB-D, DELIVER).
    first_class_id: ClassVar[int] = 0
    # Sources stored as grey images that may be saved with three equal channels (`squeeze_grey`).
    grey_sources: ClassVar[tuple[str, ...]] = ()

    def load(self, record: Record) -> Sample:
        if self.has_labels and LABEL not in record.files:
            raise SampleError("missing_modality", f"{record.key}: no label file", _first(record))
        sample: Sample = {"key": record.key, "meta": dict(record.meta)}
        sample.update(self.decode(record, sample["meta"]))
        return self.finish(sample, record)

    def decode(self, record: Record, meta: dict[str, Any]) -> dict[str, np.ndarray]:
        """Arrays per sample entry (modality or `label`); default: one file per entry.
        `meta` is the sample's meta dict, for facts found while decoding."""
        arrays = {source: read_image(path) for source, path in record.files.items()}
        return {s: squeeze_grey(a) if s in self.grey_sources else a for s, a in arrays.items()}

    def convert_label(self, label: np.ndarray) -> np.ndarray:
        """Release ids -> train ids via `label_map`; unlisted values become `ignore_index`."""
        mapping = self.label_map()
        if mapping is None:
            return label
        return remap_labels(label, mapping, self.ignore_index if self.ignore_index is not None else 255)

    def label_map(self) -> Mapping[int, int] | None:
        """Release id -> train id: `first_class_id + k` -> k for each class."""
        if not self.class_names:
            return None
        return {self.first_class_id + k: k for k in range(len(self.class_names))}
