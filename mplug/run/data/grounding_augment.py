"""The authors' grounding training augmentation (AliceMind mPLUG/dataset/grounding_dataset.py:345-377
``make_transforms('train')``, dataset/vg_transforms.py), written with Pillow + torch: RandomSelect between a resize of
the long side to one of seven scales and (short side to 400 / 500 / 600, a random 384..600 crop, the long-side
resize), colour jitter, Gaussian blur, a horizontal flip that swaps "left" / "right" in the query, then CLIP's
normalisation on a zero square canvas at a random place. The switches are their grounding_mplug_large.yaml:7-10.
Every random choice comes from the random.Random passed in (theirs mix random, numpy and torch generators).
"""
from __future__ import annotations

import random
import re
from typing import NamedTuple, Tuple

import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps

from mplug.run.data.grounding_transforms import (Letterboxed, check_box, check_size, normalise_and_pad, resize_long_side,
                                                 resize_short_side, to_unit_tensor)
from mplug.run.data.transforms import CLIP_MEAN, CLIP_STD

SIDE_WORDS = ("left", "right", "top", "bottom", "middle")  # vg_transforms.py:225: such a query is never cropped
SHORT_SIDES = (400, 500, 600)  # grounding_dataset.py:365 RandomResize([400, 500, 600], with_long_side=False)
CROP_MIN, CROP_MAX, CROP_TRIES = 384, 600, 20  # grounding_dataset.py:366 RandomSizeCrop(384, 600); max_try 20 (:190)
CROP_PROBABILITY = 0.5  # grounding_dataset.py:357 (aug_crop)
JITTER, JITTER_PROBABILITY = 0.4, 0.8  # grounding_dataset.py:371 ColorJitter(0.4, 0.4, 0.4); vg_transforms.py:120
BLUR_SIGMA = (0.1, 2.0)  # vg_transforms.py:136, applied with probability 0.5 when aug_blur (:138)
ENHANCERS = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)  # vg_transforms.py:70-110


class Augment(NamedTuple):
    """Which augmentations run; the defaults are the authors' grounding_mplug_large.yaml:7-10 (aug_blur False,
    aug_crop True, aug_scale True, aug_translate True)."""

    scale: bool = True
    crop: bool = True
    translate: bool = True
    blur: bool = False

    @classmethod
    def from_config(cls, cfg: dict) -> "Augment":
        """The switches of a run config's aug_scale / aug_crop / aug_translate / aug_blur (absent: the defaults)."""
        return cls(**{field: cfg.get(f"aug_{field}", default) for field, default in cls._field_defaults.items()})


def train_scales(size: int, scale: bool = True) -> Tuple[int, ...]:
    """The long sides RandomResize draws from: size - (size // 20) * i for i in 0..6 with aug_scale, else size
    (grounding_dataset.py:348-354)."""
    check_size(size)
    return tuple(size - (size // 20) * i for i in range(7)) if scale else (size,)


def crop(image: Image.Image, box: torch.Tensor, top: int, left: int, height: int, width: int):
    """The height x width region at (top, left), box shifted into it and clamped to [0, width] x [0, height]
    (vg_transforms.py:17-28)."""
    check_box(box)
    shifted = box - torch.tensor([left, top, left, top], dtype=box.dtype)
    limit = torch.tensor([width, height], dtype=box.dtype)
    clamped = torch.minimum(shifted.view(2, 2), limit).clamp(min=0).reshape(4)
    return image.crop((left, top, left + width, top + height)), clamped


def random_size_crop(image: Image.Image, box: torch.Tensor, rng: random.Random):
    """Their RandomSizeCrop(384, 600) (vg_transforms.py:189-213): up to 20 tries of a random width and height in
    384..600 (at most the image's) at a random place, kept when the box centre's x > the crop's top and its y > the
    crop's left (their comparison of box x with region[0] = top, as written); else the image unchanged."""
    check_box(box)
    if min(image.size) < CROP_MIN:
        raise ValueError(f"image must be at least {CROP_MIN} px on each side (resize its short side first), got {image.size}")
    centre_x, centre_y = float(box[0] + box[2]) / 2, float(box[1] + box[3]) / 2
    for _ in range(CROP_TRIES):
        width = rng.randint(CROP_MIN, min(image.width, CROP_MAX))
        height = rng.randint(CROP_MIN, min(image.height, CROP_MAX))
        top, left = rng.randint(0, image.height - height), rng.randint(0, image.width - width)
        if centre_x > top and centre_y > left:
            return crop(image, box, top, left, height, width)
    return image, box


def resize_and_crop(image: Image.Image, box: torch.Tensor, text: str, scales, crop_probability: float, rng: random.Random):
    """Their RandomSelect (vg_transforms.py:216-233): a query with a SIDE_WORDS substring, or else with probability
    1 - crop_probability, only has its long side resized to a scale; otherwise short side to 400 / 500 / 600,
    random_size_crop, then the long-side resize."""
    if not any(word in text for word in SIDE_WORDS) and rng.random() < crop_probability:
        image, box = resize_short_side(image, box, rng.choice(SHORT_SIDES))
        image, box = random_size_crop(image, box, rng)
    return resize_long_side(image, box, rng.choice(scales))


def color_jitter(image: Image.Image, rng: random.Random) -> Image.Image:
    """With probability 0.8, brightness, contrast and saturation in a random order, each by a factor uniform in
    [0.6, 1.4] (vg_transforms.py:70-132)."""
    if rng.random() >= JITTER_PROBABILITY:
        return image
    for enhancer in rng.sample(ENHANCERS, len(ENHANCERS)):
        image = enhancer(image).enhance(rng.uniform(1 - JITTER, 1 + JITTER))
    return image


def gaussian_blur(image: Image.Image, rng: random.Random) -> Image.Image:
    """With probability 0.5, a Gaussian blur of radius uniform in [0.1, 2] (vg_transforms.py:135-147)."""
    if rng.random() >= 0.5:
        return image
    return image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(*BLUR_SIGMA)))


def swap_sides(text: str) -> str:
    """"left" and "right" exchanged wherever they occur, inside words too ("bright" -> "bleft"), as their three
    str.replace calls do (vg_transforms.py:158)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return re.sub("left|right", lambda match: "right" if match.group() == "left" else "left", text)


def mirror(image: Image.Image, box: torch.Tensor, text: str):
    """The image flipped left to right, box (x1, y1, x2, y2) -> (W - x2, y1, W - x1, y2), text's sides swapped
    (vg_transforms.py:150-166)."""
    check_box(box)
    x1, y1, x2, y2 = box.tolist()
    flipped = torch.tensor([image.width - x2, y1, image.width - x1, y2], dtype=box.dtype)
    return ImageOps.mirror(image), flipped, swap_sides(text)


def augment_train(image: Image.Image, box: torch.Tensor, text: str, size: int, rng: random.Random,
                  augment: Augment = Augment()) -> Tuple[Letterboxed, str]:
    """A grounding training sample as their make_transforms('train') makes it: (letterboxed image, mask and
    normalised (cx, cy, w, h) box on a size x size canvas with CLIP mean / std, the query after a possible flip)."""
    check_size(size)
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    crop_probability = CROP_PROBABILITY if augment.crop else 0.0
    image, box = resize_and_crop(image.convert("RGB"), box, text, train_scales(size, augment.scale), crop_probability, rng)
    image = color_jitter(image, rng)
    if augment.blur:
        image = gaussian_blur(image, rng)
    if rng.random() < 0.5:
        image, box, text = mirror(image, box, text)
    placement = rng if augment.translate else None
    return normalise_and_pad(to_unit_tensor(image), box, size, CLIP_MEAN, CLIP_STD, placement), text
