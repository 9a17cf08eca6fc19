"""Training-time augmentations of the authors' data readers beyond the image transforms."""
from __future__ import annotations

import random
from typing import Tuple

import torch

SIDE_SWAP = {"left": "right", "right": "left"}


def nlvr_swap(images: torch.Tensor, sentence: str, rng: random.Random) -> Tuple[torch.Tensor, str]:
    """With probability 1/2 the pair [2, ...] in the other order and the words "left"/"right" exchanged (AliceMind
    mPLUG/dataset/nlvr_dataset.py:45-66); else both unchanged."""
    if rng.random() >= 0.5:
        return images, sentence
    return images.flip(0), " ".join(SIDE_SWAP.get(word, word) for word in sentence.split(" "))
