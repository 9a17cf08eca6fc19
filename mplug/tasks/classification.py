"""Classification tasks on an MPLUG model over the fused text [CLS]: SNLI-VE (3-way: entailment, neutral,
contradiction, one image per hypothesis) and NLVR2 (true/false, two images per sentence, each fused with the
sentence, the pair of fused [CLS] states classified together).

The heads (``ve_head``: hidden -> hidden -> 3, ``nlvr_head``: 2 hidden -> 2 hidden -> 2, ReLU between) are added to
the model on first use or by ``add_classifier_heads`` (call it before building the optimizer).
``MPLUG.ve_loss`` / ``ve_predict`` / ``nlvr_loss`` / ``nlvr_predict`` call these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mplug.tasks.pretraining import encode_images
from mplug.model.validation import describe
from mplug.tasks.video import default_mask

# The authors' class indices (AliceMind mPLUG/dataset/ve_dataset.py:14: entailment 2, neutral 1, contradiction 0), so a
# loaded cls_head keeps its meaning.
VE_LABELS = ("contradiction", "neutral", "entailment")


def classifier(width: int, classes: int) -> nn.Sequential:
    """Linear(width, width), ReLU, Linear(width, classes)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes))


def add_classifier_heads(model):
    """Add ``ve_head`` and ``nlvr_head`` when missing (on the model's device and dtype); returns the model."""
    hidden = model.config.hidden_size
    reference = model.itm_head.weight
    for name, width, classes in (("ve_head", hidden, len(VE_LABELS)), ("nlvr_head", 2 * hidden, 2)):
        if not hasattr(model, name):
            model.add_module(name, classifier(width, classes).to(device=reference.device, dtype=reference.dtype))
    return model


def fused_cls(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask) -> torch.Tensor:
    """The fused text [CLS] state [B, hidden] of images [B, 3, H, W] with texts [B, L]."""
    image_embeds, image_mask = encode_images(model, images)
    text_mask = default_mask(text_ids, text_mask)
    text_embeds = model.text_encoder(text_ids, text_mask)
    return model.fusion_encoder(image_embeds, image_mask, text_embeds, text_mask)[1][:, 0]


def _check_labels(labels, batch: int, classes: int) -> None:
    if not isinstance(labels, torch.Tensor) or labels.dtype != torch.long or labels.shape != (batch,):
        raise ValueError(f"labels must be a long tensor [B] = [{batch}], got {describe(labels)}")
    if bool(((labels < 0) | (labels >= classes)).any()):
        raise ValueError(f"labels must be class indices in [0, {classes}), got {labels.tolist()}")


def ve_logits(model, images, text_ids, text_mask=None) -> torch.Tensor:
    """SNLI-VE logits [B, 3] (contradiction, neutral, entailment) of images [B, 3, H, W] and hypotheses [B, L]."""
    return add_classifier_heads(model).ve_head(fused_cls(model, images, text_ids, text_mask))


def ve_loss(model, images, text_ids, text_mask, labels) -> torch.Tensor:
    """Mean cross-entropy of ve_logits against labels long [B] (0 contradiction, 1 neutral, 2 entailment)."""
    _check_labels(labels, text_ids.shape[0], len(VE_LABELS))
    return F.cross_entropy(ve_logits(model, images, text_ids, text_mask).float(), labels)


@torch.no_grad()
def ve_predict(model, images, text_ids, text_mask=None) -> torch.Tensor:
    """Predicted SNLI-VE classes long [B] (indices into VE_LABELS)."""
    return ve_logits(model, images, text_ids, text_mask).argmax(-1)


def check_image_pairs(images) -> None:
    """images must be a float tensor [B, 2, 3, H, W]: two images per sentence."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 5 or images.shape[1] != 2:
        raise ValueError(f"images must be a float tensor [B, 2, 3, H, W] (two images per sentence for NLVR2), got {describe(images)}")


def nlvr_logits(model, images, text_ids, text_mask=None) -> torch.Tensor:
    """NLVR2 logits [B, 2] (false, true) of image pairs [B, 2, 3, H, W] and sentences [B, L]: both images fused with
    the sentence in one batch, nlvr_head over the two fused [CLS] states side by side."""
    check_image_pairs(images)
    if isinstance(text_ids, torch.Tensor) and text_ids.dim() and text_ids.shape[0] != images.shape[0]:
        raise ValueError(f"images has {images.shape[0]} pairs but text_ids ({describe(text_ids)}) has {text_ids.shape[0]} rows")
    batch = images.shape[0]
    text_mask = default_mask(text_ids, text_mask)
    both = fused_cls(model, images.transpose(0, 1).flatten(0, 1), text_ids.repeat(2, 1), text_mask.repeat(2, 1))
    return add_classifier_heads(model).nlvr_head(torch.cat([both[:batch], both[batch:]], dim=-1))


def nlvr_loss(model, images, text_ids, text_mask, labels) -> torch.Tensor:
    """Mean cross-entropy of nlvr_logits against labels long [B] (1 = the sentence is true of the pair)."""
    check_image_pairs(images)
    _check_labels(labels, images.shape[0], 2)
    return F.cross_entropy(nlvr_logits(model, images, text_ids, text_mask).float(), labels)


@torch.no_grad()
def nlvr_predict(model, images, text_ids, text_mask=None) -> torch.Tensor:
    """Predicted NLVR2 labels long [B] (1 = true)."""
    return nlvr_logits(model, images, text_ids, text_mask).argmax(-1)
