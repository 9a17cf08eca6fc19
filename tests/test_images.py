"""Image files as the data sets open them (mplug.run.data.images): high bit depths scaled to 8 bits, not saturated;
undecodable files and decompression bombs refused as BadImage naming the file."""
from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from mplug.run.data.images import BadImage, open_rgb


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, pixels: np.ndarray, color_type: int) -> None:
    """A PNG written by hand (Pillow cannot write 16-bit RGB): pixels uint16 [H, W] (grey, 0) or [H, W, 3] (RGB, 2)."""
    height, width = pixels.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(rows))
                     + _png_chunk(b"IEND", b""))


def levels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_16_bit_grey_png_is_scaled_not_saturated(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 8).round().astype(np.uint16).reshape(8, 64)
    write_png(tmp_path / "grey16.png", ramp, color_type=0)
    with Image.open(tmp_path / "grey16.png") as raw:
        assert raw.mode.startswith("I")  # what convert("RGB") used to saturate to 255 (white)
    got = levels(open_rgb(tmp_path / "grey16.png"))
    np.testing.assert_allclose(got[..., 0], ramp / 257.0, atol=0.51)
    assert (got[..., 0] == got[..., 2]).all() and got.min() == 0 and got.max() == 255


def test_16_bit_rgb_png_is_scaled(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 65536, size=(6, 5, 3)).astype(np.uint16)
    write_png(tmp_path / "rgb16.png", pixels, color_type=2)
    got = levels(open_rgb(tmp_path / "rgb16.png"))
    np.testing.assert_allclose(got, pixels / 257.0, atol=1.01)  # Pillow keeps the high byte: within one level


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (-3.0, 500.0)])
def test_float_tiff_is_scaled(tmp_path, low, high):
    values = np.linspace(low, high, 40, dtype=np.float32).reshape(4, 10)
    Image.fromarray(values).save(tmp_path / "float.tif")
    got = levels(open_rgb(tmp_path / "float.tif"))[..., 0]
    np.testing.assert_allclose(got, (values - low) / (high - low) * 255.0, atol=0.51)


def test_non_finite_float_tiff_is_a_bad_image(tmp_path):
    Image.fromarray(np.array([[0.5, np.nan]], dtype=np.float32)).save(tmp_path / "nan.tif")
    with pytest.raises(BadImage, match="nan.tif.*NaN or infinite"):
        open_rgb(tmp_path / "nan.tif")


def test_8_bit_images_are_unchanged(tmp_path):
    image = Image.new("P", (3, 2), 7)
    image.putpalette([0, 0, 0] * 7 + [10, 20, 30])
    image.save(tmp_path / "palette.png")
    assert levels(open_rgb(tmp_path / "palette.png")).tolist() == [[[10, 20, 30]] * 3] * 2


def test_truncated_png_is_a_bad_image_naming_the_file(tmp_path):
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="cut.png"):
        open_rgb(tmp_path / "cut.png")


def write_bomb(path, side: int) -> None:
    """A tiny PNG of side x side black pixels (compresses to a few KB)."""
    rows = zlib.compress(b"\x00" * (side + 1) * side, 9)  # 8-bit grey rows of zeros
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", rows)
                     + _png_chunk(b"IEND", b""))


def test_decompression_bomb_is_a_bad_image_naming_file_and_limit(tmp_path):
    write_bomb(tmp_path / "bomb.png", 20000)
    assert (tmp_path / "bomb.png").stat().st_size < 1_000_000
    with pytest.raises(BadImage, match="bomb.png is over the limit max_image_pixels = 89478485 .*400000000 pixels"):
        open_rgb(tmp_path / "bomb.png")
    write_bomb(tmp_path / "small.png", 40)
    with pytest.raises(BadImage, match="small.png is 40x40 = 1600 pixels, over the limit max_image_pixels = 1000"):
        open_rgb(tmp_path / "small.png", max_pixels=1000)
    assert open_rgb(tmp_path / "small.png", max_pixels=1600).size == (40, 40)


def test_max_pixels_is_checked():
    with pytest.raises(ValueError, match="max_image_pixels.*got 0"):
        open_rgb("unused.png", max_pixels=0)
