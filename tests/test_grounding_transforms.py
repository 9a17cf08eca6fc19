"""Grounding letterbox of the authors' evaluation (AliceMind mPLUG/dataset/grounding_dataset.py:379-383,
vg_transforms.py:31-39 and 248-285) and their training augmentation (grounding_dataset.py:345-377,
vg_transforms.py:17-213), worked by hand on tiny images."""
import random

import pytest
import torch
from PIL import Image

from mplug.run.data.grounding_augment import (
    Augment,
    augment_train,
    color_jitter,
    crop,
    mirror,
    random_size_crop,
    swap_sides,
    train_scales,
)
from mplug.run.data.grounding_transforms import IMAGENET_MEAN, IMAGENET_STD, letterbox_eval, normalise_and_pad
from mplug.run.data.transforms import CLIP_MEAN, CLIP_STD

RED = (255, 0, 0)


def red_box_image(width, height, box):
    image = Image.new("RGB", (width, height), (0, 0, 255))
    x1, y1, x2, y2 = box
    for x in range(x1, x2):
        for y in range(y1, y2):
            image.putpixel((x, y), RED)
    return image


def test_wide_image_by_hand():
    # 8 x 4 image, red box x 2..4, y 1..3 (x1 y1 x2 y2 = 2 1 4 3). size 16: ratio 2 -> 16 x 8, box 4 2 8 6;
    # dh = 8: top = round(4 - 0.1) = 4, left = round(-0.1) = 0 -> box 4 6 8 10 -> (cx, cy, w, h) = (6, 8, 4, 4) / 16.
    out = letterbox_eval(red_box_image(8, 4, (2, 1, 4, 3)), torch.tensor([2.0, 1.0, 4.0, 3.0]), 16)
    torch.testing.assert_close(out.box, torch.tensor([0.375, 0.5, 0.25, 0.25]))
    assert out.mask[:4].all() and out.mask[12:].all() and not out.mask[4:12].any()
    assert bool((out.image[:, :4] == 0).all()) and bool((out.image[:, 12:] == 0).all())  # padding is 0 after normalising
    red = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1], -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    # the box's pixels (away from its bilinear edge) stay red inside the transformed box: x 5..7, y 7..9
    inside = out.image[:, 7:9, 5:7]
    torch.testing.assert_close(inside, red.view(3, 1, 1).expand_as(inside), atol=0.05, rtol=0)
    blue = torch.tensor([-IMAGENET_MEAN[0] / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1], (1 - IMAGENET_MEAN[2]) / IMAGENET_STD[2]])
    torch.testing.assert_close(out.image[:, 4, 14], blue, atol=0.05, rtol=0)  # outside the box: the blue background


def test_tall_image_centres_with_their_rounding():
    # 3 wide x 6 tall, size 6: ratio 1; dw = 3: left = round(1.5 - 0.1) = 1 (plain round(1.5) would give 2), top 0.
    out = normalise_and_pad(torch.ones(3, 6, 3), torch.tensor([0.0, 0.0, 3.0, 6.0]), 6)
    assert out.mask[:, 0].all() and not out.mask[:, 1:4].any() and out.mask[:, 4:].all()
    torch.testing.assert_close(out.box, torch.tensor([2.5 / 6, 0.5, 0.5, 1.0]))
    with pytest.raises(ValueError, match="does not fit"):
        normalise_and_pad(torch.ones(3, 7, 3), torch.zeros(4), 6)


class Scripted:
    """A random.Random stand-in that returns scripted values and records the ranges it was asked for."""

    def __init__(self, randoms=(), randints=(), choices=(), uniforms=()):
        self.randoms, self.randints, self.choices, self.uniforms = list(randoms), list(randints), list(choices), list(uniforms)
        self.asked = []

    def random(self):
        return self.randoms.pop(0)

    def randint(self, low, high):
        self.asked.append((low, high))
        value = self.randints.pop(0)
        assert low <= value <= high
        return value

    def choice(self, options):
        value = self.choices.pop(0)
        assert value in options
        return value

    def sample(self, population, k):
        return list(population)[:k]  # keep the listed order

    def uniform(self, low, high):
        return self.uniforms.pop(0)


def clip_colour(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD)])


def test_scales_are_seven_steps_of_a_twentieth():
    # grounding_dataset.py:350-352: rate = imsize // 20, scales imsize - rate * i, i = 0..6: 336 // 20 = 16, 384 // 20 = 19
    assert train_scales(336) == (336, 320, 304, 288, 272, 256, 240)
    assert train_scales(384) == (384, 365, 346, 327, 308, 289, 270)
    assert train_scales(336, scale=False) == (336,)


def test_flip_moves_the_box_and_swaps_left_and_right():
    # vg_transforms.py:157-160: 8 px wide, box x 2..4 -> (8 - 4, 8 - 2) = x 4..6; 'left' <-> 'right' by str.replace,
    # inside words too ('bright' -> 'bleft', their quirk)
    image, box = red_box_image(8, 4, (2, 1, 4, 3)), torch.tensor([2.0, 1.0, 4.0, 3.0])
    flipped, moved, text = mirror(image, box, "the left dog")
    assert text == "the right dog" and moved.tolist() == [4.0, 1.0, 6.0, 3.0]
    assert [flipped.getpixel((x, 1)) for x in range(8)] == [(0, 0, 255)] * 4 + [RED] * 2 + [(0, 0, 255)] * 2
    assert box.tolist() == [2.0, 1.0, 4.0, 3.0] and image.getpixel((2, 1)) == RED  # inputs untouched
    assert swap_sides("right of the left bright cup") == "left of the right bleft cup"
    with pytest.raises(TypeError, match="text must be a str"):
        swap_sides(None)


def test_crop_shifts_and_clamps_the_box_inside():
    # vg_transforms.py:17-28: region top 2, left 3, 4 x 5: box (2, 1, 9, 7) - (3, 2, 3, 2) = (-1, -1, 6, 5),
    # min with (w, h) = (5, 4) -> (-1, -1, 5, 4), clamp at 0 -> (0, 0, 5, 4)
    image = red_box_image(10, 8, (2, 1, 9, 7))
    region, box = crop(image, torch.tensor([2.0, 1.0, 9.0, 7.0]), top=2, left=3, height=4, width=5)
    assert region.size == (5, 4) and box.tolist() == [0.0, 0.0, 5.0, 4.0]
    assert region.getpixel((0, 0)) == RED and region.getpixel((4, 3)) == RED


def test_random_size_crop_tests_the_centre_against_top_and_left_as_written():
    # vg_transforms.py:201-211 on a 600 x 450 image: w in 384..600, h in 384..450, top in 0..450-h, left in 0..600-w;
    # kept when centre x > top and centre y > left. Box (10, 300, 50, 340), centre (30, 320): try 1 (400 x 400 at
    # top 40) fails, 30 > 40 false; try 2 (384 x 384 at top 20, left 200) is kept although the box lies left of it:
    # (10 - 200, 300 - 20, 50 - 200, 340 - 20) clamped -> (0, 280, 0, 320)
    image, box = Image.new("RGB", (600, 450)), torch.tensor([10.0, 300.0, 50.0, 340.0])
    rng = Scripted(randints=[400, 400, 40, 100, 384, 384, 20, 200])
    region, cropped = random_size_crop(image, box, rng)
    assert rng.asked == [(384, 600), (384, 450), (0, 50), (0, 200), (384, 600), (384, 450), (0, 66), (0, 216)]
    assert region.size == (384, 384) and cropped.tolist() == [0.0, 280.0, 0.0, 320.0]
    never = Scripted(randints=[400, 400, 40, 0] * 20)  # 20 tries, each failing: the image and box unchanged
    assert random_size_crop(image, box, never) == (image, box) and not never.randints
    with pytest.raises(ValueError, match="image must be at least 384 px on each side"):
        random_size_crop(Image.new("RGB", (600, 383)), box, Scripted())


def test_colour_jitter_by_hand_on_a_grey_image():
    # vg_transforms.py:119-132: with probability 0.8; brightness 1.2 on grey 100 -> 120; contrast and saturation of a
    # uniform grey image leave it (it is its own mean and has no colour)
    grey = Image.new("RGB", (4, 4), (100, 100, 100))
    assert color_jitter(grey, Scripted(randoms=[0.85])) is grey
    assert color_jitter(grey, Scripted(randoms=[0.1], uniforms=[1.2, 0.7, 1.3])).getpixel((1, 1)) == (120, 120, 120)


def test_train_sample_by_hand_flip_and_translate():
    # 40 x 20 image, red box (4, 2, 12, 10), 'the left dog', size 20 (scales 20..14). 'left' -> no crop draw
    # (vg_transforms.py:225-228); long side to 20: ratio 0.5 -> 20 x 10, box (2, 1, 6, 5); jitter skipped (0.9 >= 0.8);
    # flip (0.3 < 0.5): box (20 - 6, 1, 20 - 2, 5) = (14, 1, 18, 5), 'the right dog'; translate: top = randint(0, 10)
    # = 3, left = randint(0, 0) = 0 -> box (14, 4, 18, 8) -> (cx, cy, w, h) = (16, 6, 4, 4) / 20; CLIP mean / std
    image, box = red_box_image(40, 20, (4, 2, 12, 10)), torch.tensor([4.0, 2.0, 12.0, 10.0])
    rng = Scripted(randoms=[0.9, 0.3], randints=[3, 0], choices=[20])
    out, text = augment_train(image, box, "the left dog", 20, rng)
    assert text == "the right dog" and rng.asked == [(0, 10), (0, 0)]
    torch.testing.assert_close(out.box, torch.tensor([0.8, 0.3, 0.2, 0.2]))
    assert out.mask[:3].all() and not out.mask[3:13].any() and out.mask[13:].all()
    assert bool((out.image[:, :3] == 0).all()) and bool((out.image[:, 13:] == 0).all())
    torch.testing.assert_close(out.image[:, 5:7, 15:17], clip_colour(RED).view(3, 1, 1).expand(3, 2, 2), atol=0.05, rtol=0)
    torch.testing.assert_close(out.image[:, 10, 4], clip_colour((0, 0, 255)), atol=0.05, rtol=0)
    assert box.tolist() == [4.0, 2.0, 12.0, 10.0]


def test_random_train_samples_keep_the_box_on_the_image():
    # the full pipeline with real draws (crop branch included: 'a red box' has no side word): the box stays inside
    # the unpadded part of the canvas, the query is unchanged or swapped
    image, box = red_box_image(64, 48, (16, 8, 48, 40)), torch.tensor([16.0, 8.0, 48.0, 40.0])
    for seed in range(12):
        out, text = augment_train(image, box, "a red box", 32, random.Random(seed), Augment(blur=True))
        rows, cols = (~out.mask).nonzero(as_tuple=True)
        cx, cy, w, h = (out.box * 32).tolist()
        assert rows.min() - 1e-4 <= cy - h / 2 and cy + h / 2 <= rows.max() + 1 + 1e-4, seed
        assert cols.min() - 1e-4 <= cx - w / 2 and cx + w / 2 <= cols.max() + 1 + 1e-4, seed
        assert text == "a red box" and out.image.shape == (3, 32, 32)


def test_bad_arguments_are_named():
    image = Image.new("RGB", (8, 8))
    with pytest.raises(ValueError, match="box must be a float tensor"):
        augment_train(image, torch.tensor([1, 2, 3, 4]), "a dog", 8, random.Random(0))
    with pytest.raises(ValueError, match="size must be a positive int"):
        augment_train(image, torch.tensor([1.0, 2.0, 3.0, 4.0]), "a dog", 0, random.Random(0))
    with pytest.raises(TypeError, match="text must be a str"):
        augment_train(image, torch.tensor([1.0, 2.0, 3.0, 4.0]), 5, 8, random.Random(0))
