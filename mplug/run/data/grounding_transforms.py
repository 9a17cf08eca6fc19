"""Grounding images letterboxed as the authors' code does (AliceMind mPLUG/dataset/grounding_dataset.py:345-384
``make_transforms``, dataset/vg_transforms.py), the box (x1, y1, x2, y2 pixels) moved with the image and returned as
normalised (cx, cy, w, h) in the padded square. Evaluation (:379-383): RandomResize([imsize]), ToTensor,
NormalizeAndPad(size=imsize) with its default ImageNet mean / std (vg_transforms.py:248), while training normalises
with CLIP's (:375-376); that quirk is kept. The training augmentation is mplug.run.data.grounding_augment.
"""
from __future__ import annotations

import random
from typing import NamedTuple, Optional, Tuple

import torch
from PIL import Image

from mplug.model.validation import describe

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # vg_transforms.py:248, NormalizeAndPad's default mean / std
IMAGENET_STD = (0.229, 0.224, 0.225)


class Letterboxed(NamedTuple):
    """image float [3, S, S]; mask bool [S, S] (True = padding, their out_mask 1); box float [4] normalised
    (cx, cy, w, h) in the padded image."""

    image: torch.Tensor
    mask: torch.Tensor
    box: torch.Tensor


def check_box(box) -> None:
    """box must be a float tensor [4] (x1, y1, x2, y2) in pixels."""
    if not isinstance(box, torch.Tensor) or not box.is_floating_point() or box.shape != (4,):
        raise ValueError(f"box must be a float tensor [4] (x1, y1, x2, y2) in pixels, got {describe(box)}")


def check_size(size) -> None:
    """size must be a positive int."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size must be a positive int (the square's side in pixels), got {size!r}")


def pixel_box(box, width: int, height: int) -> torch.Tensor:
    """Normalised (cx, cy, w, h) in a width x height image -> float [4] (x1, y1, x2, y2) in pixels."""
    cx, cy, w, h = (float(value) for value in box)
    return torch.tensor([(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height])


def _resize_side(image: Image.Image, box: torch.Tensor, size: int, side: int):
    check_size(size)
    check_box(box)
    ratio = size / float(side)
    resized = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BILINEAR)
    return resized, box * ratio


def resize_long_side(image: Image.Image, box: torch.Tensor, size: int) -> Tuple[Image.Image, torch.Tensor]:
    """image resized (bilinear) so its long side is size (sides rounded), box (x1, y1, x2, y2) pixels scaled alike
    (vg_transforms.py:31-39)."""
    return _resize_side(image, box, size, max(image.height, image.width))


def resize_short_side(image: Image.Image, box: torch.Tensor, size: int) -> Tuple[Image.Image, torch.Tensor]:
    """image resized (bilinear) so its short side is size (sides rounded), box scaled alike (vg_transforms.py:42-49)."""
    return _resize_side(image, box, size, min(image.height, image.width))


def to_unit_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float [3, H, W] in [0, 1] (their ToTensor)."""
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(image.height, image.width, 3)
    return pixels.permute(2, 0, 1).float() / 255.0


def normalise_and_pad(pixels: torch.Tensor, box: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      rng: Optional[random.Random] = None) -> Letterboxed:
    """pixels float [3, h, w] in [0, 1] normalised by mean / std and placed on a zero size x size canvas, box
    (x1, y1, x2, y2) shifted with it then normalised (cx, cy, w, h) (vg_transforms.py:247-287). Without rng centred:
    top = round((size - h) / 2 - 0.1), likewise left; with rng (their aug_translate) top = rng.randint(0, size - h),
    then left = rng.randint(0, size - w)."""
    check_size(size)
    check_box(box)
    height, width = pixels.shape[1:]
    if height > size or width > size:
        raise ValueError(f"image {width}x{height} does not fit the {size}x{size} canvas; resize its long side first")
    if rng is None:
        top, left = round((size - height) / 2.0 - 0.1), round((size - width) / 2.0 - 0.1)
    else:
        top = rng.randint(0, size - height)
        left = rng.randint(0, size - width)
    normalised = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    image = torch.zeros(3, size, size)
    image[:, top:top + height, left:left + width] = normalised
    mask = torch.ones(size, size, dtype=torch.bool)
    mask[top:top + height, left:left + width] = False
    x1, y1, x2, y2 = (box.float() + torch.tensor([left, top, left, top], dtype=torch.float32)).tolist()
    centred = torch.tensor([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1]) / size
    return Letterboxed(image, mask, centred)


def letterbox_eval(image: Image.Image, box: torch.Tensor, size: int) -> Letterboxed:
    """A grounding test image as their evaluation feeds it: long side to size, to [0, 1], ImageNet mean / std,
    centred on a size x size zero canvas; box (x1, y1, x2, y2) pixels -> normalised (cx, cy, w, h)."""
    resized, scaled = resize_long_side(image.convert("RGB"), box, size)
    return normalise_and_pad(to_unit_tensor(resized), scaled, size)
