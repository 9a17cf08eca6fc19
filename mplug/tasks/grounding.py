"""Visual grounding (referring expressions) on an MPLUG model: the decoder reads the fused [v; t] and writes a box
as tokens: a reserved prefix token, then the box's cx, cy, w, h (normalised to [0, 1]) each quantised to
image_size + 1 levels and written as a reserved coordinate token. As the authors' models/model_grounding_mplug.py:
the decoder input starts at the prefix with no [CLS] (:138-143), coordinates are floored (:200) and the loss weights
compare the argmax box with the unquantised target in normalised units (:153-157).

Token ids: the prefix is mask_token_id + 1 (BERT's first [unused] id after [MASK], 104), coordinate level n is
prefix + 1 + n; the authors' [unused339] / [unused340 + n] rows are moved onto these ids when their grounding file is
loaded (mplug.model.checkpoint). ``MPLUG.ground`` / ``grounding_loss`` call these.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from mplug.tasks.pretraining import encode_images
from mplug.model.validation import describe
from mplug.tasks.video import default_mask

MAX_L1_WEIGHT = 5.0  # the authors' clamp(0, 5) (model_grounding_mplug.py:157); their L1 is in normalised units, so it never bites


class GroundingTokens(NamedTuple):
    """prefix id, first coordinate id, number of coordinate levels (image_size + 1)."""

    prefix: int
    first_coordinate: int
    levels: int


def grounding_tokens(config) -> GroundingTokens:
    """The reserved ids of a config; ValueError when they do not fit its vocabulary."""
    prefix = config.mask_token_id + 1
    tokens = GroundingTokens(prefix, prefix + 1, config.image_size + 1)
    last = tokens.first_coordinate + tokens.levels - 1
    if last >= config.vocab_size:
        raise ValueError(
            f"grounding needs token ids {prefix}..{last} (prefix + image_size + 1 = {tokens.levels} coordinate levels) "
            f"but vocab_size is {config.vocab_size}"
        )
    return tokens


def check_boxes(name: str, boxes, batch: int) -> None:
    """boxes must be a float tensor [batch, 4] of normalised (cx, cy, w, h) in [0, 1]."""
    if not isinstance(boxes, torch.Tensor) or not boxes.is_floating_point() or boxes.shape != (batch, 4):
        raise ValueError(f"{name} must be a float tensor [B, 4] = [{batch}, 4] of normalised (cx, cy, w, h), got {describe(boxes)}")
    outside = ((boxes < 0) | (boxes > 1) | boxes.isnan()).any(dim=1).nonzero().flatten().tolist()
    if outside:
        raise ValueError(f"{name}: rows {outside} have coordinates outside [0, 1] ({boxes[outside[:3]].tolist()}); boxes are normalised")


def quantize_boxes(boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """Normalised boxes [..., 4] in [0, 1] -> levels long [..., 4] in [0, image_size], floored as the authors'
    process_target (model_grounding_mplug.py:200)."""
    return torch.floor(boxes * image_size).long()


def dequantize_boxes(levels: torch.Tensor, image_size: int) -> torch.Tensor:
    """Levels [..., 4] in [0, image_size] -> normalised boxes [..., 4] (float32)."""
    return levels.float() / image_size


def box_corners(boxes: torch.Tensor) -> torch.Tensor:
    """(cx, cy, w, h) [..., 4] -> (x0, y0, x1, y1) [..., 4]."""
    centre, size = boxes[..., :2], boxes[..., 2:]
    return torch.cat([centre - size / 2, centre + size / 2], dim=-1)


def box_iou_giou(a: torch.Tensor, b: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """IoU and generalised IoU [...] of paired (cx, cy, w, h) boxes a, b [..., 4] (empty union -> IoU 0)."""
    a, b = box_corners(a), box_corners(b)
    area = lambda box: (box[..., 2] - box[..., 0]).clamp(min=0) * (box[..., 3] - box[..., 1]).clamp(min=0)
    inner = torch.cat([torch.maximum(a[..., :2], b[..., :2]), torch.minimum(a[..., 2:], b[..., 2:])], dim=-1)
    outer = torch.cat([torch.minimum(a[..., :2], b[..., :2]), torch.maximum(a[..., 2:], b[..., 2:])], dim=-1)
    intersection = area(inner)
    union = area(a) + area(b) - intersection
    iou = torch.where(union > 0, intersection / union.clamp(min=1e-12), torch.zeros_like(union))
    enclosing = area(outer)
    giou = iou - torch.where(enclosing > 0, (enclosing - union) / enclosing.clamp(min=1e-12), torch.zeros_like(union))
    return iou, giou


def grounding_accuracy(pred_boxes: torch.Tensor, target_boxes: torch.Tensor, threshold: float = 0.5) -> float:
    """Fraction of predicted boxes [B, 4] whose IoU with the target [B, 4] (both normalised cx, cy, w, h) is >= threshold."""
    check_boxes("target_boxes", target_boxes, pred_boxes.shape[0])
    iou, _ = box_iou_giou(pred_boxes.double(), target_boxes.double())
    return float((iou >= threshold).double().mean())


def _fused_memory(model, images, text_ids, text_mask):
    """(memory, memory masks) of the decoder: the fused [v; t]."""
    image_embeds, image_mask = encode_images(model, images)
    text_embeds = model.text_encoder(text_ids, text_mask)
    image_out, text_out = model.fusion_encoder(image_embeds, image_mask, text_embeds, text_mask)
    return (image_out, text_out), (image_mask, text_mask)


def _coordinate_logits(model, decoder_ids, memory, memory_masks) -> torch.Tensor:
    """Decoder logits [B, L, levels] over the coordinate tokens only."""
    tokens = grounding_tokens(model.config)
    mask = torch.ones(decoder_ids.shape, dtype=torch.bool, device=decoder_ids.device)
    logits = model.text_decoder(decoder_ids, mask, memory=memory, memory_masks=memory_masks)
    return logits[..., tokens.first_coordinate:tokens.first_coordinate + tokens.levels]


def _prompt(model, batch: int, device) -> torch.Tensor:
    """The prefix alone [B, 1], no [CLS] (the authors' model_grounding_mplug.py:138-143)."""
    return torch.full((batch, 1), grounding_tokens(model.config).prefix, dtype=torch.long, device=device)


@torch.no_grad()
def ground(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask=None) -> torch.Tensor:
    """Boxes [B, 4] (normalised cx, cy, w, h) of the expressions text_ids [B, L] in images [B, 3, H, W]: from
    the prefix, 4 greedy decoder steps restricted to the coordinate tokens."""
    text_mask = default_mask(text_ids, text_mask)
    memory, memory_masks = _fused_memory(model, images, text_ids, text_mask)
    ids = _prompt(model, text_ids.shape[0], text_ids.device)
    levels = []
    for _ in range(4):
        level = _coordinate_logits(model, ids, memory, memory_masks)[:, -1].argmax(-1)
        levels.append(level)
        ids = torch.cat([ids, level[:, None] + grounding_tokens(model.config).first_coordinate], dim=1)
    return dequantize_boxes(torch.stack(levels, dim=1), model.config.image_size)


def weighted_coordinate_loss(coordinate_logits: torch.Tensor, target_boxes: torch.Tensor, image_size: int) -> torch.Tensor:
    """coordinate_logits [B, 4, levels], target_boxes [B, 4] (normalised cx, cy, w, h) -> scalar, as the authors'
    model_grounding_mplug.py:153-163: weight w[j, k] = clamp(|argmax box - target box|[j, k], 0, 5) x (1 - GIoU(argmax
    box j, target box j)), boxes normalised, without gradient; cross-entropy ce[i, k] against the floored target level.
    Their loss_seq.view(B, -1, 4) [B, 1, 4] x weight [B, 4] broadcasts to [B, B, 4] (:160-161), so the loss is
    mean over i, j, k of ce[i, k] w[j, k] = mean_k(mean_i ce[i, k] x mean_j w[j, k]): each coordinate's cross-entropy
    takes the batch's mean weight of that coordinate (per sample only when B = 1)."""
    target_levels = quantize_boxes(target_boxes, image_size)
    with torch.no_grad():
        predicted = dequantize_boxes(coordinate_logits.argmax(-1), image_size).double()
        l1 = (predicted - target_boxes.double()).abs().clamp(0, MAX_L1_WEIGHT)
        _, giou = box_iou_giou(predicted, target_boxes.double())
        weights = l1 * (1 - giou)[:, None]
    losses = F.cross_entropy(coordinate_logits.float().flatten(0, 1), target_levels.flatten(), reduction="none")
    return (losses.view(-1, 4).mean(0) * weights.float().mean(0)).mean()


def grounding_loss(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask, boxes: torch.Tensor) -> torch.Tensor:
    """Grounding fine-tuning loss of expressions text_ids [B, L] in images [B, 3, H, W] with target boxes [B, 4]
    (normalised cx, cy, w, h in [0, 1]): the decoder, teacher-forced on prefix cx cy w h, predicts each
    coordinate token over the coordinate tokens; weighted_coordinate_loss."""
    text_mask = default_mask(text_ids, text_mask)
    batch = text_ids.shape[0] if isinstance(text_ids, torch.Tensor) and text_ids.dim() else -1
    check_boxes("boxes", boxes, batch)
    targets = quantize_boxes(boxes, model.config.image_size)
    memory, memory_masks = _fused_memory(model, images, text_ids, text_mask)
    first = grounding_tokens(model.config).first_coordinate
    decoder_ids = torch.cat([_prompt(model, batch, text_ids.device), targets[:, :3] + first], dim=1)
    logits = _coordinate_logits(model, decoder_ids, memory, memory_masks)
    return weighted_coordinate_loss(logits, boxes, model.config.image_size)
