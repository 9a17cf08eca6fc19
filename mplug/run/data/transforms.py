"""Image transforms as the authors use them (their torchvision pipeline, written with Pillow + torch): training =
random resized crop (bicubic) + horizontal flip + RandAugment(2 ops, magnitude 7) + CLIP normalisation; evaluation =
bicubic resize + CLIP normalisation. Every random choice comes from the random.Random passed in."""
from __future__ import annotations

import math
import random
from typing import Tuple

import torch
from PIL import Image, ImageEnhance, ImageOps

# CLIP's image mean / std (the authors' transforms.Normalize).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# RandAugment as the authors configure it: 2 ops (drawn with replacement, each applied with probability 0.5) at
# magnitude 7 of 10; shear 0.3, translation 10 px and rotation 30 degrees at magnitude 10, a random sign, grey fill.
NUM_OPS, MAGNITUDE, MAX_MAGNITUDE = 2, 7, 10
FILL = (128, 128, 128)
# Random resized crop areas: fine-tuning (0.5, 1), pretraining (0.2, 1); aspect ratios (3/4, 4/3).
FINETUNE_SCALE, PRETRAIN_SCALE, RATIO = (0.5, 1.0), (0.2, 1.0), (3.0 / 4.0, 4.0 / 3.0)


def crop_box(width: int, height: int, rng: random.Random, scale, ratio=RATIO) -> Tuple[int, int, int, int]:
    """(left, top, right, bottom) of a random crop with area in scale x the image and aspect ratio in ratio (log
    uniform), ten tries, else the largest central crop with the ratio clamped to that range."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.randint(0, width - w), rng.randint(0, height - h)
            return left, top, left + w, top + h
    aspect = min(max(width / height, ratio[0]), ratio[1])
    w, h = (width, round(width / aspect)) if width / height <= aspect else (round(height * aspect), height)
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def _signed(value: float, rng: random.Random) -> float:
    return -value if rng.random() < 0.5 else value


def _affine(image: Image.Image, coefficients) -> Image.Image:
    return image.transform(image.size, Image.Transform.AFFINE, coefficients, fillcolor=FILL)


def augment_op(image: Image.Image, name: str, rng: random.Random) -> Image.Image:
    """One RandAugment op of the authors' list at MAGNITUDE."""
    level = MAGNITUDE / MAX_MAGNITUDE
    if name == "identity":
        return image
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name in ("brightness", "sharpness"):
        enhancer = ImageEnhance.Brightness if name == "brightness" else ImageEnhance.Sharpness
        return enhancer(image).enhance(level * 1.8 + 0.1)
    if name == "rotate":
        return image.rotate(_signed(level * 30.0, rng), fillcolor=FILL)
    shear, shift = _signed(level * 0.3, rng), _signed(level * 10.0, rng)
    coefficients = {
        "shear_x": (1, shear, 0, 0, 1, 0), "shear_y": (1, 0, 0, shear, 1, 0),
        "translate_x": (1, 0, shift, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, shift),
    }[name]
    return _affine(image, coefficients)


AUGMENT_OPS = ("identity", "autocontrast", "equalize", "brightness", "sharpness", "shear_x", "shear_y",
               "translate_x", "translate_y", "rotate")


def rand_augment(image: Image.Image, rng: random.Random) -> Image.Image:
    """NUM_OPS ops drawn from AUGMENT_OPS (with replacement), each applied with probability 0.5."""
    for name in [rng.choice(AUGMENT_OPS) for _ in range(NUM_OPS)]:
        if rng.random() < 0.5:
            image = augment_op(image, name, rng)
    return image


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 [3, H, W] in [0, 1], normalised with CLIP_MEAN / CLIP_STD."""
    width, height = image.size
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    pixels = pixels.permute(2, 0, 1).float().div_(255.0)
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


def train_transform(image: Image.Image, size: int, rng: random.Random, scale=FINETUNE_SCALE) -> torch.Tensor:
    """RGB image -> [3, size, size]: random resized crop (bicubic), flip with probability 0.5, RandAugment, normalise."""
    box = crop_box(*image.size, rng, scale)
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    if rng.random() < 0.5:
        image = ImageOps.mirror(image)
    return to_normalized_tensor(rand_augment(image, rng))


def eval_transform(image: Image.Image, size: int) -> torch.Tensor:
    """RGB image -> [3, size, size]: bicubic resize to size x size, normalise."""
    return to_normalized_tensor(image.resize((size, size), Image.Resampling.BICUBIC))
