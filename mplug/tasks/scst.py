"""Self-critical sequence training as the authors train mPLUG's captioner (AliceMind mPLUG/caption_mplug_scst.py:55-90):
the top num_beams beams of their beam search, searched WITH gradients (predictor.py translate_batch_scst has no
no_grad), each beam's log-probability its length-penalised beam score divided by its token count, the baseline the
mean reward of the image's beams, loss = -mean((score / tokens) * (reward - baseline)).

The reward (CIDEr-D on PTB-tokenised words, document frequencies from the batch's references) is computed outside the
model (mplug.run.scst_reward) and passed in as ``reward_fn``. Our sampling variant with a greedy baseline stays in
mplug.tasks.finetune.caption_scst_loss.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from mplug.tasks.inference import _generate
from mplug.tasks.pretraining import encode_images

RewardFn = Callable[[List[List[List[int]]]], torch.Tensor]
"""Generated ids per image and beam ([B][K] lists of ids, cut before the end token) -> rewards [B, K]."""


def authors_scst_objective(scores: torch.Tensor, token_counts: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """The authors' SCST loss (caption_mplug_scst.py:84-87) from beam scores [B, K] (length-penalised, with gradients),
    token counts [B, K] (their item.numel(): start token + generated tokens) and rewards [B, K]: the baseline is the
    mean reward over the K beams; loss = mean over B x K of -(scores / token_counts) * (rewards - baseline)."""
    if not scores.shape == token_counts.shape == rewards.shape or scores.dim() != 2:
        raise ValueError(f"scores, token_counts and rewards must all be [B, K], got {tuple(scores.shape)}, "
                         f"{tuple(token_counts.shape)}, {tuple(rewards.shape)}")
    rewards = rewards.to(scores.dtype)
    advantage = rewards - rewards.mean(dim=1, keepdim=True)
    return (-(scores / token_counts.to(scores.dtype)) * advantage).mean()


def beam_ids(sequences: torch.Tensor, lengths: torch.Tensor, eos_token_id: int) -> List[List[List[int]]]:
    """Generated ids [B, K, T] with lengths [B, K] -> each beam's ids before its first end token."""
    out = []
    for row, row_lengths in zip(sequences.tolist(), lengths.tolist()):
        beams = [ids[:length] for ids, length in zip(row, row_lengths)]
        out.append([ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids for ids in beams])
    return out


def authors_scst_loss(
    model,
    images: torch.Tensor,
    reward_fn: RewardFn,
    *,
    num_beams: int = 5,
    min_length: int = 8,
    max_length: int = 25,
    alpha: float = 0.6,
    prompt_ids: Optional[torch.Tensor] = None,
    use_cache: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The authors' SCST step on images [B, 3, H, W] -> (loss, rewards [B, K]): the authors' beam search (num_beams
    beams, min/max_length, alpha) from prompt_ids [B, P] (default [CLS]) with gradients through the image encoder and
    decoder, the top K = num_beams hypotheses scored by reward_fn, then authors_scst_objective."""
    config = model.config
    image_embeds, image_mask = encode_images(model, images)
    if prompt_ids is None:
        prompt_ids = torch.full((images.shape[0], 1), config.bos_token_id, dtype=torch.long, device=images.device)
    search = dict(min_length=min_length, max_length=max_length, alpha=alpha, num_return_sequences=num_beams)
    beams = _generate(model, (image_embeds,), (image_mask,), prompt_ids, num_beams, use_cache, **search)
    rewards = reward_fn(beam_ids(beams.sequences, beams.lengths, config.eos_token_id))
    rewards = torch.as_tensor(rewards, device=beams.scores.device)
    if rewards.shape != beams.scores.shape:
        raise ValueError(f"reward_fn must return [B, K] = {tuple(beams.scores.shape)} rewards, got {tuple(rewards.shape)}")
    token_counts = beams.lengths + prompt_ids.shape[1]  # the authors' item.numel(): the prompt, then every output token
    return authors_scst_objective(beams.scores, token_counts, rewards), rewards
