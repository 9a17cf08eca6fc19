"""Grounding images letterboxed as the authors' evaluation does (AliceMind mPLUG/dataset/grounding_dataset.py:379-383
``make_transforms`` for val / test: RandomResize([imsize]), ToTensor, NormalizeAndPad(size=imsize)), the box moved
with the image. Their evaluation normalises with ImageNet's mean / std (NormalizeAndPad's defaults,
vg_transforms.py:248) while training uses CLIP's; that quirk is kept. Their training augmentation (scale, crop,
translate, colour jitter, blur, flip with "left"/"right" swapped, grounding_dataset.py:345-377) is not here yet.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # vg_transforms.py:248, NormalizeAndPad's default mean / std
IMAGENET_STD = (0.229, 0.224, 0.225)


class Letterboxed(NamedTuple):
    """image float [3, S, S]; mask bool [S, S] (True = padding, their out_mask 1); box float [4] normalised
    (cx, cy, w, h) in the padded image."""

    image: torch.Tensor
    mask: torch.Tensor
    box: torch.Tensor


def resize_long_side(image: Image.Image, box: torch.Tensor, size: int):
    """image resized so its long side is size (sides rounded), box (x1, y1, x2, y2) pixels scaled alike
    (vg_transforms.py:31-39)."""
    ratio = size / float(max(image.height, image.width))
    resized = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BILINEAR)
    return resized, box * ratio


def normalise_and_pad(pixels: torch.Tensor, box: torch.Tensor, size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Letterboxed:
    """pixels float [3, h, w] in [0, 1] normalised by mean / std and centred in a zero size x size canvas (top =
    round((size - h) / 2 - 0.1), likewise left), box (x1, y1, x2, y2) shifted with it then normalised (cx, cy, w, h)
    (vg_transforms.py:248-285, aug_translate off)."""
    height, width = pixels.shape[1:]
    if height > size or width > size:
        raise ValueError(f"image {width}x{height} does not fit the {size}x{size} canvas; resize its long side first")
    top, left = round((size - height) / 2.0 - 0.1), round((size - width) / 2.0 - 0.1)
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
    pixels = torch.frombuffer(bytearray(resized.tobytes()), dtype=torch.uint8).view(resized.height, resized.width, 3)
    return normalise_and_pad(pixels.permute(2, 0, 1).float() / 255.0, scaled, size)
