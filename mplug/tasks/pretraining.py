"""mPLUG's pretraining on an MPLUG model: ITC, ITM, MLM and prefix-LM losses with momentum distillation, and the
unimodal encoders and heads every task shares.

``MPLUG.pretrain_losses`` calls these.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mplug.model.validation import check_images, text_inputs
from mplug.tasks.momentum import MomentumView, add_momentum_copies, momentum_update
from mplug.tasks.objectives import (
    bank_batch,
    contrastive_loss,
    contrastive_targets,
    distilled_targets,
    enqueue,
    feature_bank,
    global_token_mean,
    itc_loss,
    mask_tokens,
    prefix_split,
    random_prefix_lengths,
    sample_hard_negatives,
    soft_cross_entropy,
    upcast,
)


OBJECTIVES = ("itc", "itm", "mlm", "prefix_lm")


def _check_batches(images: torch.Tensor, ids_name: str, ids) -> None:
    if isinstance(images, torch.Tensor) and isinstance(ids, torch.Tensor) and images.dim() and ids.dim():
        if images.shape[0] != ids.shape[0]:
            raise ValueError(
                f"images has batch {images.shape[0]} but {ids_name} has batch {ids.shape[0]} (shape {tuple(ids.shape)}); they must match"
            )


def encode_images(model, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """images [B, 3, H, W] -> (image_embeds [B, Lv, hidden], image_mask bool [B, Lv], all True)."""
    image_embeds = model.visual_encoder(images)
    return image_embeds, torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=image_embeds.device)


def contrastive_features(model, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unimodal [CLS] states [B, L, hidden] -> normalised ITC features (image [B, E], text [B, E])."""
    image_feat = F.normalize(model.vision_proj(image_embeds[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    return image_feat, text_feat


def itm_logits(model, image_embeds, image_mask, text_embeds, text_mask) -> torch.Tensor:
    """Matched/unmatched logits [B, 2] of pairs (image_embeds[b], text_embeds[b]) from the fused text [CLS]."""
    _, text_out = model.fusion_encoder(image_embeds, image_mask, text_embeds, text_mask)
    return model.itm_head(text_out[:, 0])


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor, soft_labels: Optional[torch.Tensor] = None, alpha: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of logits [B, L, V] at labels [B, L] (-100 ignored), averaged over the tokens of every process;
    with soft_labels [B, L, V] (a momentum model's probabilities) (1 - alpha) * that + alpha * the soft cross-entropy."""
    losses = F.cross_entropy(upcast(logits.flatten(0, 1)), labels.flatten(), reduction="none").view(labels.shape)
    if soft_labels is not None:
        losses = (1.0 - alpha) * losses + alpha * soft_cross_entropy(logits, soft_labels)
    return global_token_mean(losses, labels)


class Teacher(NamedTuple):
    """The momentum model (a MomentumView) and its unimodal outputs on the batch: embeds [B, L, hidden], ITC features [B, E]."""

    model: MomentumView
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor
    image_feat: torch.Tensor
    text_feat: torch.Tensor


@torch.no_grad()
def momentum_teacher(model, images, text_ids, text_mask) -> Teacher:
    """Run the momentum copies' encoders on the batch (no gradients)."""
    view = MomentumView(model)
    image_embeds, _ = encode_images(view, images)
    text_embeds = view.text_encoder(text_ids, text_mask)
    return Teacher(view, image_embeds, text_embeds, *contrastive_features(view, image_embeds, text_embeds))


def pretrain_losses(
    model,
    images: torch.Tensor,
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    *,
    mlm_probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
    mlm_inputs: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    prefix_lengths: Optional[torch.Tensor] = None,
    update_queue: bool = True,
    objectives: Sequence[str] = OBJECTIVES,
    distill: bool = True,
    alpha: Optional[float] = None,
    image_ids: Optional[torch.Tensor] = None,
    itc_bank: str = "local",
) -> Dict[str, torch.Tensor]:
    """images [B, 3, H, W], right-padded texts [CLS] .. [SEP] ids [B, L] with bool mask -> {"itc", "itm", "mlm",
    "prefix_lm"} scalar losses (or those named in ``objectives``; ITM needs B >= 2 for hard negatives).

    distill=True (the paper's momentum distillation, ALBEF's): momentum copies of the encoders, projections, fusion,
    MLM head and decoder (added on first use, EMA rate config.momentum) give ITC its contrast bank (their features of
    every process's batch, then the queue) and soft targets alpha * softmax(momentum similarity) + (1 - alpha) *
    hard; ITM draws negatives from online-vs-momentum similarity; MLM and PrefixLM mix in the momentum model's
    probabilities with weight alpha (default config.alpha; ramp it over epoch 0 with mplug.tasks.momentum.ramped_alpha).
    distill=False: ITC contrasts online features of every process's batch and the queue, one-hot targets.
    image_ids [B] (long >= 0, optional): pairs of one image id are ITC positives (the queue keeps the ids) and never
    each other's ITM negatives; without, each pair is its own positive.

    Random choices (MLM masking, PrefixLM split, hard negatives) use ``generator``; ``mlm_inputs`` = (masked ids,
    labels) and ``prefix_lengths`` [B] fix the first two. In training mode with update_queue the momentum copies
    take their EMA step (before the forward, as the authors do) and the queues take this batch's features (the
    momentum ones when distilling; pairs with a non-finite feature are skipped with a RuntimeWarning). Under
    DistributedDataParallel the token losses average over all tokens; ITC contrasts this process's batch and the
    queue (itc_bank="local", the authors': models/model_retrieval_mplug.py:48,52; the queue takes every process's
    features), or with itc_bank="global" every process's batch, so the gradients equal one process's on the combined
    batch (ITM draws negatives within each process).
    """
    unknown = set(objectives) - set(OBJECTIVES)
    if unknown or not objectives:
        raise ValueError(f"objectives must be a non-empty subset of {OBJECTIVES}, got {tuple(objectives)}")
    check_images("images", images)
    text_ids, text_mask = text_inputs("text_ids", text_ids, "text_mask", text_mask, images.shape[0])
    alpha = model.config.alpha if alpha is None else alpha
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _check_image_ids(image_ids, text_ids)
    update = update_queue and model.training
    if distill:
        add_momentum_copies(model)
        if update:
            momentum_update(model, model.config.momentum)
    image_embeds, image_mask = encode_images(model, images)
    text_embeds = model.text_encoder(text_ids, text_mask)
    image_feat, text_feat = contrastive_features(model, image_embeds, text_embeds)
    temp = model.temp.clamp(0.001, 0.5)
    teacher = momentum_teacher(model, images, text_ids, text_mask) if distill else None
    losses = {}
    if "itc" in objectives:
        losses["itc"] = _itc_loss(model, image_feat, text_feat, temp, teacher, image_ids, alpha, itc_bank)
    if "itm" in objectives:
        losses["itm"] = _itm_loss(model, image_embeds, image_mask, text_embeds, text_mask, image_feat, text_feat, temp, generator, teacher, image_ids)
    if "mlm" in objectives:
        losses["mlm"] = _mlm_loss(model, image_embeds, image_mask, text_ids, text_mask, mlm_inputs, mlm_probability, generator, teacher, alpha)
    if "prefix_lm" in objectives:
        if prefix_lengths is None:
            prefix_lengths = random_prefix_lengths(text_mask, generator)
        losses["prefix_lm"] = _prefix_lm_loss(model, image_embeds, image_mask, text_ids, text_mask, prefix_lengths, teacher, alpha)
    if update:
        queued = (teacher.image_feat, teacher.text_feat) if teacher else (image_feat, text_feat)
        enqueue(model.image_queue, model.text_queue, model.queue_ptr, *queued, model.idx_queue, image_ids)
    return losses


def _check_image_ids(image_ids, text_ids) -> None:
    if image_ids is None:
        return
    if not isinstance(image_ids, torch.Tensor) or image_ids.dtype != torch.long or image_ids.shape != text_ids.shape[:1]:
        got = f"shape {tuple(image_ids.shape)}, dtype {image_ids.dtype}" if isinstance(image_ids, torch.Tensor) else type(image_ids).__name__
        raise ValueError(f"image_ids must be a long tensor [B] = [{text_ids.shape[0]}], got {got}")
    if bool((image_ids < 0).any()):
        raise ValueError(f"image_ids must be >= 0 (-1 marks queue entries without an id), got {image_ids.tolist()}")


def _itc_loss(model, image_feat, text_feat, temp, teacher, image_ids, alpha, bank="local"):
    """ITC of the online features against a bank: the momentum (distilling) or online features of this process's
    (bank "local") or every process's ("global") batch, then the queues; targets one-hot or by image id, distilled
    with the momentum similarities."""
    if teacher is None and image_ids is None:
        return itc_loss(image_feat, text_feat, temp, model.image_queue, model.text_queue, bank)[0]
    source = (teacher.image_feat, teacher.text_feat) if teacher else (image_feat, text_feat)
    all_image, offset = bank_batch(source[0], bank)
    all_text, _ = bank_batch(source[1], bank)
    image_bank, text_bank = feature_bank(all_image, model.image_queue), feature_bank(all_text, model.text_queue)
    bank_ids = None if image_ids is None else torch.cat([bank_batch(image_ids, bank)[0], model.idx_queue[0]])
    targets = contrastive_targets(image_feat.shape[0], offset, image_bank.shape[1], image_feat.device, image_ids, bank_ids)
    targets_i2t = targets_t2i = targets.to(image_feat.dtype)
    if teacher is not None:
        cold = temp.detach()
        targets_i2t = distilled_targets(teacher.image_feat @ text_bank / cold, targets_i2t, alpha)
        targets_t2i = distilled_targets(teacher.text_feat @ image_bank / cold, targets_t2i, alpha)
    return contrastive_loss(image_feat, text_feat, image_bank, text_bank, temp, targets_i2t, targets_t2i)[0]


def _mlm_loss(model, image_embeds, image_mask, text_ids, text_mask, mlm_inputs, probability, generator, teacher, alpha):
    """Masked tokens predicted from the fused text (masked text encoded, then fused with the image)."""
    config = model.config
    if mlm_inputs is None:
        special_ids = (config.pad_token_id, config.bos_token_id, config.eos_token_id)
        mlm_inputs = mask_tokens(
            text_ids, text_mask, vocab_size=config.vocab_size, mask_token_id=config.mask_token_id,
            special_ids=special_ids, probability=probability, generator=generator,
        )
    masked_ids, labels = mlm_inputs
    _, masked_out = model.fusion_encoder(image_embeds, image_mask, model.text_encoder(masked_ids, text_mask), text_mask)
    soft_labels = None
    if teacher is not None:
        with torch.no_grad():
            masked_m = teacher.model.text_encoder(masked_ids, text_mask)
            _, masked_out_m = teacher.model.fusion_encoder(teacher.image_embeds, image_mask, masked_m, text_mask)
            soft_labels = torch.softmax(upcast(teacher.model.mlm_head(masked_out_m)), dim=-1)
    return token_loss(model.mlm_head(masked_out), labels, soft_labels, alpha)


def _itm_loss(model, image_embeds, image_mask, text_embeds, text_mask, image_feat, text_feat, temp, generator, teacher, image_ids):
    """ITM over B matched pairs, B images with a hard-negative text and B texts with a hard-negative image (drawn
    by online-vs-momentum similarity when distilling, never of the same image id)."""
    image_bank, text_bank = (teacher.image_feat, teacher.text_feat) if teacher else (image_feat, text_feat)
    sim_i2t = (image_feat @ text_bank.t()).detach() / temp.detach()
    sim_t2i = (text_feat @ image_bank.t()).detach() / temp.detach()
    negative_text = sample_hard_negatives(sim_i2t, generator, image_ids)
    negative_image = sample_hard_negatives(sim_t2i, generator, image_ids)
    images = torch.cat([image_embeds, image_embeds, image_embeds[negative_image]])
    texts = torch.cat([text_embeds, text_embeds[negative_text], text_embeds])
    masks = torch.cat([text_mask, text_mask[negative_text], text_mask])
    logits = itm_logits(model, images, image_mask.repeat(3, 1), texts, masks)
    batch = image_embeds.shape[0]
    labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
    return F.cross_entropy(upcast(logits), labels)


def _prefix_lm_loss(model, image_embeds, image_mask, text_ids, text_mask, prefix_lengths, teacher, alpha):
    """The decoder predicts each text's remainder from the fused [v; prefix] (mixed with the momentum model's
    probabilities when distilling)."""
    config = model.config
    prefix_ids, prefix_mask, decoder_ids, decoder_mask, labels = prefix_split(
        text_ids, text_mask, prefix_lengths,
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id,
    )
    image_out, prefix_out = model.fusion_encoder(image_embeds, image_mask, model.text_encoder(prefix_ids, prefix_mask), prefix_mask)
    logits = model.text_decoder(decoder_ids, decoder_mask, memory=(image_out, prefix_out), memory_masks=(image_mask, prefix_mask))
    soft_labels = None
    if teacher is not None:
        with torch.no_grad():
            m = teacher.model
            memory_m = m.fusion_encoder(teacher.image_embeds, image_mask, m.text_encoder(prefix_ids, prefix_mask), prefix_mask)
            logits_m = m.text_decoder(decoder_ids, decoder_mask, memory=memory_m, memory_masks=(image_mask, prefix_mask))
            soft_labels = torch.softmax(upcast(logits_m), dim=-1)
    return token_loss(logits, labels, soft_labels, alpha)
