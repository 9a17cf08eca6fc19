"""Opening one image file as 8-bit RGB: high-bit-depth modes scaled to 8 bits (not saturated by convert("RGB")),
undecodable files and images over a pixel limit (decompression bombs) refused as BadImage, naming the file."""
from __future__ import annotations

import warnings

import numpy as np
from PIL import Image

from mplug.run.config_checks import DEFAULT_MAX_PIXELS  # Pillow's own default limit; max_image_pixels' default
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImage(ValueError):
    """An image file that cannot be used: it does not decode, or it has more pixels than allowed."""


def _gray_to_rgb(levels: np.ndarray) -> Image.Image:
    return Image.fromarray(np.rint(levels).astype(np.uint8)).convert("RGB")


def to_8bit_rgb(image: Image.Image) -> Image.Image:
    """An opened image as 8-bit RGB: 16-bit grey (I;16*, I) scaled by 255/65535, float (F) in [0, 1] scaled by 255
    (other ranges stretched from their min to their max); every other mode through convert("RGB")."""
    if image.mode in SIXTEEN_BIT_MODES:
        levels = np.asarray(image, dtype=np.float64)
        return _gray_to_rgb(np.clip(levels, 0, 65535) * (255.0 / 65535.0))
    if image.mode == "F":
        levels = np.asarray(image, dtype=np.float64)
        if not np.isfinite(levels).all():
            raise BadImage("float image (mode F) with NaN or infinite pixels")
        low, high = float(levels.min()), float(levels.max())
        if low < 0.0 or high > 1.0:
            levels = (levels - low) / (high - low) if high > low else np.zeros_like(levels)
        return _gray_to_rgb(levels * 255.0)
    return image.convert("RGB")


def open_rgb(path, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image file at path as 8-bit RGB, decoded now; BadImage naming path when it has over max_pixels pixels (or
    over twice Pillow's MAX_IMAGE_PIXELS, which Pillow refuses itself) or does not decode (truncated, corrupt)."""
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels (config key max_image_pixels) must be an int >= 1, got {max_pixels!r}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit decides below
            with Image.open(path) as file:
                width, height = file.size
                if width * height > max_pixels:
                    raise BadImage(f"image {path} is {width}x{height} = {width * height} pixels, over the limit "
                                   f"max_image_pixels = {max_pixels} (a decompression bomb?)")
                return to_8bit_rgb(file)
    except BadImage as error:
        if str(path) in str(error):
            raise
        raise BadImage(f"cannot use image {path} ({error})") from None
    except Image.DecompressionBombError as error:
        raise BadImage(f"image {path} is over the limit max_image_pixels = {max_pixels} and Pillow's own ({error})") \
            from None
    except (OSError, ValueError, SyntaxError) as error:
        raise BadImage(f"cannot read image {path} ({type(error).__name__}: {error})") from None
