"""Reading and writing image files without losing bit depth.

Pillow decodes PNG/JPEG/BMP (8-bit, 16-bit grayscale, palette labels); tifffile decodes TIFF
(any dtype and channel count); `.npy` holds what no image format does (float maps, event
voxel grids). Every failure becomes a `SampleError` that names the file, so the shard stage
can skip it and say why.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from pipeline.data.types import SampleError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
ARRAY_SUFFIXES = (".npy",)
READABLE_SUFFIXES = IMAGE_SUFFIXES + ARRAY_SUFFIXES

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def read_image(path: Path | str) -> np.ndarray:
    """Decode an image or `.npy` file to an array in its native dtype.

    Grayscale stays HxW, colour HxWxC; palette PNGs give their indices (label maps);
    16-bit grayscale gives uint16. Truncated or corrupt files raise `SampleError`.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in READABLE_SUFFIXES:
        raise SampleError("not_an_image", f"{path}: not an image file (suffix {suffix!r})", path)
    try:
        if suffix in (".tif", ".tiff"):
            return np.asarray(tifffile.imread(path))
        if suffix == ".npy":
            return np.load(path, allow_pickle=False)
        return _read_with_pillow(path)
    except SampleError:
        raise
    except FileNotFoundError as err:
        raise SampleError("missing_file", f"{path}: file not found", path) from err
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as err:
        raise SampleError("unreadable", f"{path}: cannot decode ({err})", path) from err


def _read_with_pillow(path: Path) -> np.ndarray:
    data = path.read_bytes()
    _refuse_16bit_color_png(data, path)
    with Image.open(io.BytesIO(data)) as image:
        image.load()  # decodes fully: raises on truncated data instead of returning grey rows
        if image.mode == "CMYK" or image.mode == "YCbCr":
            image = image.convert("RGB")
        elif image.mode == "1":
            image = image.convert("L")
        array = np.asarray(image)
    if image.mode in ("I;16", "I;16B", "I;16L"):
        array = array.astype(np.uint16)
    return array


def _refuse_16bit_color_png(data: bytes, path: Path) -> None:
    """Pillow silently reduces 16-bit RGB(A) PNGs to 8 bits; refuse them rather than lose bits."""
    if data[:8] != _PNG_SIGNATURE or len(data) < 26:
        return
    bit_depth, color_type = data[24], data[25]
    if bit_depth == 16 and color_type in (2, 4, 6):
        raise SampleError(
            "unsupported",
            f"{path}: 16-bit colour PNG would lose precision when decoded; convert it to TIFF",
            path,
        )


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes for uint8 (1/3/4 channels) or uint16 single-channel arrays.

    Pillow writes no timestamps, so equal arrays give equal bytes (reproducible shards).
    """
    if array.dtype == np.uint16 and array.ndim == 2:
        image = Image.fromarray(array)  # mode I;16, written as a 16-bit grayscale PNG
    elif array.dtype == np.uint8 and (array.ndim == 2 or array.shape[2] in (3, 4)):
        image = Image.fromarray(array)
    else:
        raise ValueError(f"cannot store {array.dtype} array of shape {array.shape} as PNG")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def can_encode_png(array: np.ndarray) -> bool:
    return (array.dtype == np.uint16 and array.ndim == 2) or (
        array.dtype == np.uint8 and (array.ndim == 2 or array.shape[2] in (3, 4))
    )


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Inverse of `encode_png`: keeps 1-channel and 16-bit members exact."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
        mode = image.mode
    return array.astype(np.uint16) if mode.startswith("I;16") else array


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)
