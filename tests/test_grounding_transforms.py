"""Grounding letterbox of the authors' evaluation (AliceMind mPLUG/dataset/grounding_dataset.py:379-383,
vg_transforms.py:31-39 and 248-285), worked by hand on tiny images."""
import pytest
import torch
from PIL import Image

from mplug.run.data.grounding_transforms import IMAGENET_MEAN, IMAGENET_STD, letterbox_eval, normalise_and_pad

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
