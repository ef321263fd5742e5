"""Fake dataset trees for the reader tests: files in each release's real layout, names and bit
depths, at 8x6 pixels so the whole suite stays fast."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.data.image_io import encode_png
from pipeline.data.readers.base import DatasetReader
from pipeline.data.types import Sample

H, W = 6, 8


class Tree:
    """Writes files under a dataset root (paths relative to it), plus the small helpers the
    reader tests share; handed to tests by the `tree` fixture so none imports conftest."""

    H, W = H, W

    def __init__(self, root: Path):
        self.root = root

    def _path(self, rel: str) -> Path:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def png(self, rel: str, array: np.ndarray) -> Path:
        """8-bit 1/3/4-channel or 16-bit single-channel PNG, exactly as given."""
        path = self._path(rel)
        path.write_bytes(encode_png(np.ascontiguousarray(array)))
        return path

    def jpg(self, rel: str, array: np.ndarray, quality: int = 100, exact: bool = True) -> Path:
        """JPEG file. With `exact`, the image must survive JPEG unchanged (checked), so tests can
        assert exact values; not every flat colour survives the YCbCr round trip."""
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())))
        assert not exact or np.array_equal(decoded, array), f"{rel}: JPEG changes these values"
        path = self._path(rel)
        path.write_bytes(buffer.getvalue())
        return path

    def npy(self, rel: str, array: np.ndarray) -> Path:
        path = self._path(rel)
        np.save(path, array)
        return path

    def lines(self, rel: str, lines: list[str]) -> Path:
        path = self._path(rel)
        path.write_text("\n".join(lines) + "\n")
        return path

    @staticmethod
    def flat(value, channels: int | None = None, dtype=np.uint8) -> np.ndarray:
        """An HxW (or HxWxC) image filled with one value or one colour."""
        shape = (H, W) if channels is None else (H, W, channels)
        return np.full(shape, value, dtype=dtype)

    @staticmethod
    def label_row(values: list[int], dtype=np.uint8) -> np.ndarray:
        """An HxW label map whose first row starts with `values` (rest 0): remaps pixel by pixel."""
        label = np.zeros((H, W), dtype=dtype)
        label[0, : len(values)] = values
        return label

    @staticmethod
    def load_split(reader: DatasetReader, split: str) -> dict[str, Sample]:
        """Every sample of a split, by key."""
        return {record.key: reader.load(record) for record in reader.records(split)}


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    return Tree(tmp_path / "dataset")
