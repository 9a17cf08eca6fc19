"""Visual grounding on the tiny model: box quantisation, GIoU and the weighted coordinate loss by hand, greedy
restricted decoding, bad boxes refused; the data set's letterboxed train and test items and the 20-token query."""
import json
import math

import pytest
import torch
from PIL import Image, ImageDraw

from mplug import MPLUG, MPLUGConfig
from mplug.run.data import build_dataset, load_tokenizer
from mplug.run.data.grounding_augment import Augment
from mplug.run.data.grounding_transforms import IMAGENET_MEAN, IMAGENET_STD
from mplug.run.data.transforms import CLIP_MEAN, CLIP_STD
from mplug.run.run_config import load_config
from mplug.tasks.grounding import (
    box_iou_giou,
    dequantize_boxes,
    grounding_accuracy,
    grounding_tokens,
    quantize_boxes,
    weighted_coordinate_loss,
)
from tiny_dataset import write_tiny_dataset

CLS, SEP = 101, 102


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()


def inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=generator, dtype=torch.float64)
    ids = torch.randint(140, 200, (batch, 5), generator=generator)
    ids[:, 0], ids[:, -1] = CLS, SEP
    boxes = torch.rand(batch, 4, generator=generator, dtype=torch.float64)
    return images, ids, torch.ones(ids.shape, dtype=torch.bool), boxes


def test_tokens_are_reserved_ids_after_mask():
    tokens = grounding_tokens(MPLUGConfig.tiny())
    assert tokens == (104, 105, 33)  # tiny image_size 32 -> 33 levels, ids 105..137
    assert grounding_tokens(MPLUGConfig.base()) == (104, 105, 385)
    with pytest.raises(ValueError, match="vocab_size is 120"):
        grounding_tokens(MPLUGConfig.tiny(vocab_size=120))


def test_quantization_floors_as_the_authors():
    # floored, not rounded: the authors' process_target (mPLUG/models/model_grounding_mplug.py:200) takes
    # (targets * image_res).floor(); was round (0.124 * 4 = 0.496 and 0.126 * 4 = 0.504 straddle the old rounding)
    boxes = torch.tensor([[0.0, 1.0, 0.5, 0.26], [0.124, 0.126, 0.999, 0.001]])
    levels = quantize_boxes(boxes, 4)
    assert levels.tolist() == [[0, 4, 2, 1], [0, 0, 3, 0]]
    assert dequantize_boxes(levels, 4).tolist() == [[0.0, 1.0, 0.5, 0.25], [0.0, 0.0, 0.75, 0.0]]
    fine = torch.rand(100, 4, generator=torch.Generator().manual_seed(0))
    error = fine - dequantize_boxes(quantize_boxes(fine, 384), 384)
    assert error.min() >= -1e-7 and error.max() < 1 / 384
    assert torch.equal(quantize_boxes(dequantize_boxes(levels, 4), 4), levels)


def test_giou_by_hand():
    # corners [0, 0, .5, .5] and [.25, .25, .75, .75]: intersection 1/16, union 7/16, enclosing 9/16
    a = torch.tensor([0.25, 0.25, 0.5, 0.5], dtype=torch.float64)
    b = torch.tensor([0.5, 0.5, 0.5, 0.5], dtype=torch.float64)
    iou, giou = box_iou_giou(a, b)
    assert iou.item() == pytest.approx(1 / 7)
    assert giou.item() == pytest.approx(1 / 7 - (9 / 16 - 7 / 16) / (9 / 16))
    # disjoint: corners [0, 0, .2, .2] and [.8, .8, 1, 1]: IoU 0, GIoU = -(1 - 0.08) / 1
    iou, giou = box_iou_giou(torch.tensor([0.1, 0.1, 0.2, 0.2]), torch.tensor([0.9, 0.9, 0.2, 0.2]))
    assert iou.item() == 0 and giou.item() == pytest.approx(-0.92)
    assert box_iou_giou(a, a)[1].item() == pytest.approx(1.0)
    preds = torch.stack([a, b, a])
    assert grounding_accuracy(preds, torch.stack([a, a, b])) == pytest.approx(1 / 3)


def test_weighted_loss_on_a_hand_made_example():
    """image_size 4 (5 levels); target box (.5, .5, .5, .5) = levels (2, 2, 2, 2); argmax levels (2, 2, 4, 1)
    = box (.5, .5, 1, .25). L1 weights in normalised units (0, 0, .5, .25) (the authors' model_grounding_mplug.py:157
    compares process_bbox boxes in [0, 1], so their clamp at 5 never bites; were level units (0, 0, 2, 1));
    corners [0, .375, 1, .625] vs [.25, .25, .75, .75]: intersection .125, union .25 + .25 - .125 = .375, enclosing
    [0, .25, 1, .75] = .5 -> GIoU 1/3 - .125/.5."""
    logits = torch.zeros(1, 4, 5, dtype=torch.float64)
    for position, level in enumerate((2, 2, 4, 1)):
        logits[0, position, level] = 3.0
    logits.requires_grad_(True)
    target = torch.full((1, 4), 0.5, dtype=torch.float64)
    loss = weighted_coordinate_loss(logits, target, 4)
    giou = 1 / 3 - 0.125 / 0.5
    ce_wrong = math.log(4 + math.exp(3))  # target logit 0, one logit 3, three logits 0
    expected = (0.5 * ce_wrong + 0.25 * ce_wrong) * (1 - giou) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    # weights carry no gradient: the first two tokens (weight 0) get none, the others d(w * CE)/d logits
    assert logits.grad[0, :2].abs().max() == 0
    softmax = torch.softmax(logits.detach()[0, 2], -1)
    expected_grad = (softmax - torch.nn.functional.one_hot(torch.tensor(2), 5)) * 0.5 * (1 - giou) / 4
    torch.testing.assert_close(logits.grad[0, 2], expected_grad.double(), rtol=1e-5, atol=1e-6)


def test_weighted_loss_pairs_every_sample_with_every_weight_as_the_authors():
    """The authors' loss_seq.view(bs, -1, 4) [B, 1, 4] x weight_bbox [B, 4] x weight_giou.unsqueeze(1) [B, 1]
    (mPLUG/models/model_grounding_mplug.py:159-163) broadcasts to [B, B, 4]: loss = mean_ijk ce[i, k] w[j, k].
    B = 2, image_size 4: sample 0 as the example above (w0 = (0, 0, .5, .25) (1 - g)), sample 1 predicts its box
    (.5, .5, .5, .5) exactly (w1 = 0). Per coordinate k: mean_i ce[i, k] x mean_j w[j, k] = (ce0k + ce1k) / 2 x w0k / 2,
    so sample 1's correct tokens still get gradient (a per-sample weighting would give them none)."""
    logits = torch.zeros(2, 4, 5, dtype=torch.float64)
    for position, level in enumerate((2, 2, 4, 1)):
        logits[0, position, level] = 3.0
    logits[1, :, 2] = 3.0
    logits.requires_grad_(True)
    target = torch.full((2, 4), 0.5, dtype=torch.float64)
    loss = weighted_coordinate_loss(logits, target, 4)
    g = 1 / 3 - 0.125 / 0.5
    ce_wrong, ce_right = math.log(4 + math.exp(3)), math.log(4 + math.exp(3)) - 3
    expected = ((ce_wrong + ce_right) / 2 * 0.5 * (1 - g) / 2 + (ce_wrong + ce_right) / 2 * 0.25 * (1 - g) / 2) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-6)  # the loss is taken in float32
    loss.backward()
    softmax = torch.softmax(logits.detach()[1, 2], -1)
    expected_grad = (softmax - torch.nn.functional.one_hot(torch.tensor(2), 5)) * (0.5 * (1 - g) / 2) / 2 / 4
    torch.testing.assert_close(logits.grad[1, 2], expected_grad, rtol=1e-5, atol=1e-7)
    assert logits.grad[:, :2].abs().max() == 0  # both weights of coordinates 0 and 1 are 0


def test_ground_is_four_greedy_restricted_steps(model):
    images, ids, mask, boxes = inputs()
    predicted = model.ground(images, ids, mask)
    assert predicted.shape == (2, 4) and ((predicted >= 0) & (predicted <= 1)).all()
    # recompute by hand: each step the best coordinate token of the full decoder logits
    from mplug.tasks.pretraining import encode_images
    image_embeds, image_mask = encode_images(model, images)
    v, t = model.fusion_encoder(image_embeds, image_mask, model.text_encoder(ids, mask), mask)
    tokens = grounding_tokens(model.config)
    # no [CLS]: the authors' decoder input starts at prefix_ids (mPLUG/models/model_grounding_mplug.py:138,166-177)
    seq = torch.tensor([[tokens.prefix]] * 2)
    for _ in range(4):
        logits = model.text_decoder(seq, torch.ones(seq.shape, dtype=torch.bool), memory=(v, t), memory_masks=(image_mask, mask))
        coordinate = logits[:, -1, tokens.first_coordinate:tokens.first_coordinate + tokens.levels].argmax(-1)
        seq = torch.cat([seq, coordinate[:, None] + tokens.first_coordinate], dim=1)
    assert (predicted * 32).round().long().tolist() == (seq[:, 1:] - tokens.first_coordinate).tolist()


def test_grounding_loss_teacher_forces_prefix_then_floored_levels(model):
    """Decoder input [prefix, t0, t1, t2] with t the floored levels, no [CLS] (the authors' model_grounding_mplug.py:
    138-147 feed prefix_ids + process_target(targets), :200 floors); the 4 outputs predict t0..t3."""
    images, ids, mask, boxes = inputs(seed=2)
    boxes[0] = torch.tensor([0.999 / 32 + 0.5, 0.5, 0.25, 0.25], dtype=torch.float64)  # cx level 16.999 -> 16
    loss = model.grounding_loss(images, ids, mask, boxes)
    from mplug.tasks.pretraining import encode_images
    image_embeds, image_mask = encode_images(model, images)
    v, t = model.fusion_encoder(image_embeds, image_mask, model.text_encoder(ids, mask), mask)
    tokens = grounding_tokens(model.config)
    levels = torch.floor(boxes * 32).long()
    assert levels[0, 0] == 16
    seq = torch.cat([torch.full((2, 1), tokens.prefix), levels[:, :3] + tokens.first_coordinate], dim=1)
    logits = model.text_decoder(seq, torch.ones(seq.shape, dtype=torch.bool), memory=(v, t), memory_masks=(image_mask, mask))
    expected = weighted_coordinate_loss(logits[..., tokens.first_coordinate:tokens.first_coordinate + tokens.levels], boxes, 32)
    torch.testing.assert_close(loss, expected)


def test_grounding_loss_trains_the_decoder(model):
    images, ids, mask, boxes = inputs(seed=1)
    loss = model.grounding_loss(images, ids, mask, boxes)
    assert torch.isfinite(loss) and loss > 0
    model.zero_grad()
    loss.backward()
    touched = [p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_decoder.layers[0].crossattention.parameters()]
    assert touched and all(touched)
    model.zero_grad()


def test_bad_boxes_are_rejected(model):
    images, ids, mask, boxes = inputs()
    outside = boxes.clone()
    outside[1, 2] = 1.5
    with pytest.raises(ValueError, match=r"boxes: rows \[1\] have coordinates outside \[0, 1\]"):
        model.grounding_loss(images, ids, mask, outside)
    with pytest.raises(ValueError, match=r"boxes must be a float tensor \[B, 4\]"):
        model.grounding_loss(images, ids, mask, boxes[:, :3])


# ---- the data set: items letterboxed as the authors' make_transforms (AliceMind mPLUG/dataset/grounding_dataset.py:345-384)
def red_box_dataset(tmp_path, split, bbox, text, max_tokens=16, **overrides):
    """A grounding data set of one 64 x 48 blue image with a red [x, y, w, h] box (the tiny config: image_size 32;
    overrides: more config keys)."""
    cfg = load_config(str(write_tiny_dataset(tmp_path / "tiny", "grounding", n=1)))
    image = Image.new("RGB", (64, 48), (0, 0, 255))
    x, y, w, h = bbox
    ImageDraw.Draw(image).rectangle((x, y, x + w - 1, y + h - 1), fill=(255, 0, 0))
    image.save(tmp_path / "red.png")
    (tmp_path / "records.json").write_text(json.dumps([{"image": "red.png", "text": text, "bbox": list(bbox)}]))
    cfg = {**cfg, f"{split}_file": str(tmp_path / "records.json"), "image_root": str(tmp_path), "max_tokens": max_tokens,
           **overrides}
    return build_dataset("grounding", split, cfg, load_tokenizer(cfg["vocab"]))


def test_test_item_is_letterboxed_with_imagenet_statistics(tmp_path):
    # box x 16..48, y 8..40 of 64 x 48; size 32 (grounding_dataset.py:379-383): ratio 0.5 -> 32 x 24, box (8, 4, 24,
    # 20); top = round(4 - 0.1) = 4, left 0 -> (8, 8, 24, 24) -> (cx, cy, w, h) = (16, 16, 16, 16) / 32
    dataset = red_box_dataset(tmp_path, "test", (16, 8, 32, 32), "the red square")
    item = dataset[0]
    assert item["box"] == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert bool((item["image"][:, :4] == 0).all()) and bool((item["image"][:, 28:] == 0).all())
    red = torch.tensor([(1 - IMAGENET_MEAN[0]) / IMAGENET_STD[0], -IMAGENET_MEAN[1] / IMAGENET_STD[1], -IMAGENET_MEAN[2] / IMAGENET_STD[2]])
    torch.testing.assert_close(item["image"][:, 10:22, 10:22], red.view(3, 1, 1).expand(3, 12, 12), atol=0.05, rtol=0)
    batch = dataset.collate([item])
    assert batch["meta"]["box"] == [item["box"]] and set(batch["inputs"]) == {"images", "text_ids", "text_mask"}


def test_train_items_are_augmented_with_box_and_query_following_the_image(tmp_path):
    # box x 4..24 of 64 (centre 14 / 64 = 0.22 of the width); 'left' in the query: never cropped (vg_transforms.py:
    # 225-228); long side s in 26..32 (train_scales(32)) at left offset in [0, 32 - s]: unflipped cx <= 0.22 s + 32 - s
    # <= 11.7 px of 32, flipped cx >= 0.78 s >= 20.3 px: the query says 'right' exactly when the box is on the right
    dataset = red_box_dataset(tmp_path, "train", (4, 8, 20, 32), "the red square on the left")
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    sides = set()
    for epoch in range(8):
        dataset.set_epoch(epoch)
        item = dataset[0]
        cx, cy, w, h = (torch.tensor(item["box"]) * 32).tolist()
        side = "right" if cx > 16 else "left"
        assert item["text"] == f"the red square on the {side}" and item["image"].shape == (3, 32, 32)
        inner = (item["image"] * std + mean)[:, round(cy - h / 2) + 2:round(cy + h / 2) - 2, round(cx - w / 2) + 2:round(cx + w / 2) - 2]
        assert inner.numel() and bool((inner[0] > inner[2]).all()), epoch  # red inside the box, after colour jitter
        sides.add(side)
    assert sides == {"left", "right"}
    batch = dataset.collate([dataset[0]])
    torch.testing.assert_close(batch["inputs"]["boxes"], torch.tensor([dataset[0]["box"]]))


def test_augmentation_switches_come_from_the_config(tmp_path):
    # aug_scale false: the long side is always 32 (train_scales), so the 20-pixel-wide box of the 64-wide image is
    # 10 px wide at every epoch ('left' in the query: never cropped); the authors' defaults draw 26..32
    assert Augment.from_config(load_config("grounding_base")) == Augment(scale=True, crop=True, translate=True, blur=False)
    fixed = red_box_dataset(tmp_path / "fixed", "train", (4, 8, 20, 32), "the red square on the left", aug_scale=False,
                            aug_blur=True)
    assert fixed.augment == Augment(scale=False, crop=True, translate=True, blur=True)
    widths = set()
    for epoch in range(6):
        fixed.set_epoch(epoch)
        widths.add(round(fixed[0]["box"][2] * 32, 3))
    assert widths == {10.0}
    with pytest.raises(ValueError, match="config key 'aug_crop' must be true or false, got 3"):
        load_config("grounding_base", ["aug_crop=3"])


def test_queries_are_cut_at_twenty_tokens(tmp_path):
    # grounding_mplug_large.yaml max_query_len 20: [CLS] + 18 word pieces + [SEP] (grounding_dataset.py:91-100)
    dataset = red_box_dataset(tmp_path, "train", (4, 8, 20, 32), "the red square on the left " * 5, max_tokens=20)
    ids = dataset.collate([dataset[0]])["inputs"]["text_ids"]
    assert ids.shape == (1, 20) and ids[0, 0] == CLS and ids[0, -1] == SEP and SEP not in ids[0, :-1]
