"""Image decoding keeps bit depth and channel count, and names the file when it fails."""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline.data.image_io import decode_npy, decode_png, encode_npy, encode_png, read_image
from pipeline.data.types import SampleError

RNG = np.random.default_rng(0)


def test_16bit_grey_png_round_trips_exactly(tmp_path):
    depth = RNG.integers(0, 65536, size=(7, 9), dtype=np.uint16)
    depth[0, 0], depth[0, 1] = 65535, 54321
    path = tmp_path / "d.png"
    path.write_bytes(encode_png(depth))
    for decoded in (read_image(path), decode_png(path.read_bytes())):
        assert decoded.dtype == np.uint16 and np.array_equal(decoded, depth)


@pytest.mark.parametrize("shape", [(5, 6), (5, 6, 3), (5, 6, 4)])
def test_8bit_png_keeps_channel_count(tmp_path, shape):
    image = RNG.integers(0, 256, size=shape, dtype=np.uint8)
    assert np.array_equal(decode_png(encode_png(image)), image)


def test_png_encoding_is_deterministic():
    image = RNG.integers(0, 65536, size=(16, 16), dtype=np.uint16)
    assert encode_png(image) == encode_png(image.copy())


def test_palette_png_gives_indices(tmp_path):
    label = np.array([[0, 1, 2], [3, 4, 5]], dtype=np.uint8)
    image = Image.fromarray(label, mode="P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, 7)])
    image.save(tmp_path / "label.png")
    assert np.array_equal(read_image(tmp_path / "label.png"), label)


def test_tiff_keeps_float_and_16bit_colour(tmp_path):
    floats = RNG.random((4, 5)).astype(np.float32)
    colour16 = RNG.integers(0, 65536, size=(4, 5, 3), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "f.tif", floats)
    tifffile.imwrite(tmp_path / "c.tiff", colour16)
    assert np.array_equal(read_image(tmp_path / "f.tif"), floats)
    assert np.array_equal(read_image(tmp_path / "c.tiff"), colour16)


def test_npy_round_trip_is_bit_exact(tmp_path):
    grid = RNG.normal(size=(5, 4, 3)).astype(np.float32)
    np.save(tmp_path / "e.npy", grid)
    assert np.array_equal(read_image(tmp_path / "e.npy"), grid)
    assert np.array_equal(decode_npy(encode_npy(grid)), grid)


def test_truncated_jpeg_is_unreadable_and_named(tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(SampleError, match="cut.jpg") as info:
        read_image(path)
    assert info.value.reason == "unreadable"


def test_non_image_file_and_missing_file(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(SampleError) as info:
        read_image(tmp_path / "notes.txt")
    assert info.value.reason == "not_an_image"
    (tmp_path / "fake.png").write_text("not a png")
    with pytest.raises(SampleError) as info:
        read_image(tmp_path / "fake.png")
    assert info.value.reason == "unreadable"
    with pytest.raises(SampleError) as info:
        read_image(tmp_path / "gone.png")
    assert info.value.reason == "missing_file"


def test_16bit_colour_png_is_refused_not_reduced(tmp_path):
    # A 16-bit RGB PNG, hand-assembled (Pillow cannot write one): Pillow would decode 8 bits.
    import struct
    import zlib

    height, width = 2, 2
    rows = b"".join(b"\x00" + struct.pack(">" + "H" * 3 * width, *([1000] * 3 * width)) for _ in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    (tmp_path / "rgb16.png").write_bytes(png)
    with pytest.raises(SampleError, match="16-bit colour") as info:
        read_image(tmp_path / "rgb16.png")
    assert info.value.reason == "unsupported"


def test_sample_error_survives_pickling():
    import pickle

    error = pickle.loads(pickle.dumps(SampleError("size_mismatch", "a: sizes differ", "/x/a.png")))
    assert (error.reason, str(error), error.path) == ("size_mismatch", "a: sizes differ", "/x/a.png")
