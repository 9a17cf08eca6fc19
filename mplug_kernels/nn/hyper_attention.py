"""HyperAttention: mPLUG-Owl3's hyper attention (the 241101 release): text attends to [images ; text] in one softmax.

Owl3 (``HyperQwen2SdpaAttention.hyperattention`` in modeling_hyper_qwen2.py) keeps Qwen2's attention (q/k/v/o_proj,
grouped K/V heads, rotary positions on text queries and keys) and adds ``v_kv_proj``, one linear that turns the
visual features into K and V of every K/V head (its output laid out [Hkv, 2, D]). Each visual key is rotated by the
rotary embedding of its image's text position (the position of the image's media token), and one softmax runs over
[visual keys ; text keys] under a dense mask: a text token sees an image iff the image's position <= its own, and
the text causally. The visual features are normalised by the decoder layer's ``input_layernorm`` (the RMSNorm it
applies to the text) before they reach the attention; there is no gate in this release. Here the mask is
``concat_attention``'s positional rule: the visual keys carry their image's position, the text keys their own.

Images come padded, per sample: ``images`` [B, M, Lv, hidden], ``image_positions`` int [B, M] and ``image_counts``
int [B] (slot m of sample b holds an image iff m < image_counts[b]; None: every slot does); nothing loops over
samples or reads a value back to the host. ``pack_images`` turns Owl3's inputs (all images [N, Lv, hidden], ``media_offset`` per sample)
into this form (M = the most images of a sample). Text tokens are at ``positions`` int [B, L] (default 0..L-1; they
give the rotary angle and the visibility, as Owl3's position_ids and token index do) and ``attention_mask`` bool
[B, L] (True = a real token) hides padding from every query, which Owl3's hyper path does not (it pads on the right).
The layer takes the whole sequence at once (training, prefill): no KV cache, no dropout (Owl3's attention_dropout is
0). Where it sits: like Owl3's ``self_attn``, after the decoder layer's ``input_layernorm`` of text and images.
"""
from __future__ import annotations

import itertools
from typing import Optional, Sequence, Tuple

import torch
from torch import nn

from mplug_kernels.nn.co_attention import split_heads
from mplug_kernels.ops.concat_attention import concat_attention

INT_DTYPES = (torch.int32, torch.int64)


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """x [B, S, H, D] rotated by Qwen2's rotary embedding (halves, base theta) at int positions [B, S], in float32 or wider."""
    wide = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    inverse_frequency = 1.0 / theta ** (torch.arange(half, dtype=wide, device=x.device) * 2 / x.shape[-1])
    angles = positions.to(wide)[..., None, None] * inverse_frequency
    cos, sin = angles.cos(), angles.sin()
    first, second = x.to(wide).split(half, dim=-1)
    return torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(x.dtype)


def _describe(x) -> str:
    return f"{tuple(x.shape)} {x.dtype}" if isinstance(x, torch.Tensor) else type(x).__name__


def pack_images(image_embeds: torch.Tensor, media_offset: Sequence[Sequence[int]]):
    """Owl3's image_embeds [N, Lv, C] + media_offset -> images [B, M, Lv, C], image_positions int32 [B, M], image_counts int32 [B]."""
    counts = [len(offsets) for offsets in media_offset]
    if not isinstance(image_embeds, torch.Tensor) or image_embeds.dim() != 3 or image_embeds.shape[0] != sum(counts):
        raise ValueError(f"image_embeds must be a tensor [N, Lv, C] with N = {sum(counts)} (the images media_offset "
                         f"lists), got {_describe(image_embeds)}")
    device, slots = image_embeds.device, max(counts, default=0)
    sample = torch.repeat_interleave(torch.arange(len(counts), device=device), torch.tensor(counts, device=device))
    starts = torch.tensor([0, *itertools.accumulate(counts)][:-1], dtype=torch.long, device=device)
    slot = torch.arange(sample.shape[0], device=device) - starts[sample]
    images = image_embeds.new_zeros(len(counts), slots, *image_embeds.shape[1:]).index_put((sample, slot), image_embeds)
    positions = torch.zeros(len(counts), slots, dtype=torch.int32, device=device)
    flat = torch.tensor([int(p) for offsets in media_offset for p in offsets], dtype=torch.int32, device=device)
    positions = positions.index_put((sample, slot), flat)
    return images, positions, torch.tensor(counts, dtype=torch.int32, device=device)


def _check_int(name: str, x, shape: Tuple[int, ...], meaning: str, device: torch.device) -> None:
    if not isinstance(x, torch.Tensor) or x.dtype not in INT_DTYPES or tuple(x.shape) != shape or x.device != device:
        got = f"{_describe(x)} on {x.device}" if isinstance(x, torch.Tensor) else _describe(x)
        raise ValueError(f"{name} must be an int32 or int64 tensor {list(shape)} on {device} ({meaning}), got {got}")


def _check_text(hidden_states, hidden_size: int, positions, attention_mask) -> None:
    """hidden_states float [B, L, hidden]; positions int [B, L] or None; attention_mask bool [B, L] or None."""
    if not isinstance(hidden_states, torch.Tensor) or not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating torch.Tensor [B, L, {hidden_size}], got {_describe(hidden_states)}")
    if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size or hidden_states.shape[1] == 0:
        raise ValueError(f"hidden_states must be [B, L >= 1, {hidden_size}], got {tuple(hidden_states.shape)}")
    batch_and_length = tuple(hidden_states.shape[:2])
    if positions is not None:
        _check_int("positions", positions, batch_and_length, "each token's position", hidden_states.device)
    if attention_mask is None:
        return
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dtype != torch.bool \
            or tuple(attention_mask.shape) != batch_and_length or attention_mask.device != hidden_states.device:
        raise ValueError(f"attention_mask must be a bool tensor {list(batch_and_length)} on {hidden_states.device} "
                         f"(True = a real token), got {_describe(attention_mask)}")


def _check_images(images, image_positions, image_counts, hidden_states) -> None:
    """images [B, M, Lv, hidden] like hidden_states; image_positions int [B, M]; image_counts int [B] or None."""
    batch, hidden = hidden_states.shape[0], hidden_states.shape[-1]
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[0] != batch \
            or images.shape[3] != hidden or images.shape[2] == 0:
        raise ValueError(f"images must be a tensor [B={batch}, M, Lv >= 1, {hidden}], got {_describe(images)}")
    if images.dtype != hidden_states.dtype or images.device != hidden_states.device:
        raise TypeError(f"images ({images.dtype}, {images.device}) must have hidden_states' dtype and device "
                        f"({hidden_states.dtype}, {hidden_states.device})")
    _check_int("image_positions", image_positions, tuple(images.shape[:2]), "the text position of each image",
               images.device)
    if image_counts is not None:
        _check_int("image_counts", image_counts, (batch,), "how many of the M slots of each sample hold an image",
                   images.device)


class HyperAttention(nn.Module):
    """mPLUG-Owl3's hyper attention: text [B, L, hidden] over [its images ; the text] -> [B, L, hidden]; Owl3's submodule names."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None, *,
                 rope_theta: float = 10000.0, backend: str = "auto"):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        if hidden_size % num_heads or num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} must divide hidden_size {hidden_size} and num_kv_heads "
                             f"{num_kv_heads} must divide num_heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, hidden_size // num_heads
        self.rope_theta, self.backend = rope_theta, backend
        kv_width = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, kv_width)
        self.v_proj = nn.Linear(hidden_size, kv_width)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_kv_proj = nn.Linear(hidden_size, 2 * kv_width)

    def visual_sources(self, images, image_positions, image_counts):
        """(k, v [B, M*Lv, Hkv, D], key positions int32 [B, M*Lv], keep mask [B, M*Lv] or None) of the images."""
        _, slots, length, _ = images.shape
        kv = self.v_kv_proj(images).unflatten(-1, (self.num_kv_heads, 2, self.head_dim)).flatten(1, 2)
        key, value = kv.unbind(dim=3)
        positions = image_positions.to(torch.int32).repeat_interleave(length, dim=1)
        keep = None
        if image_counts is not None:
            used = torch.arange(slots, device=images.device) < image_counts[:, None]
            keep = used.repeat_interleave(length, dim=1)
        return rotary(key, positions, self.rope_theta), value, positions, keep

    def forward(self, hidden_states: torch.Tensor, images: Optional[torch.Tensor] = None,
                image_positions: Optional[torch.Tensor] = None, image_counts: Optional[torch.Tensor] = None, *,
                positions: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """hidden_states [B, L, hidden] over images [B, M, Lv, hidden] at image_positions [B, M] (image_counts [B]) -> [B, L, hidden]."""
        _check_text(hidden_states, self.q_proj.in_features, positions, attention_mask)
        batch, length, _ = hidden_states.shape
        if positions is None:
            positions = torch.arange(length, dtype=torch.int32, device=hidden_states.device).expand(batch, length)
        positions = positions.to(torch.int32)
        q = rotary(split_heads(self.q_proj(hidden_states), self.num_heads), positions, self.rope_theta)
        k = rotary(split_heads(self.k_proj(hidden_states), self.num_kv_heads), positions, self.rope_theta)
        ks, vs = [k], [split_heads(self.v_proj(hidden_states), self.num_kv_heads)]
        key_positions, masks = [positions], [attention_mask]
        if images is not None:
            _check_images(images, image_positions, image_counts, hidden_states)
        if images is not None and images.shape[1] > 0:
            image_k, image_v, image_pos, image_keep = self.visual_sources(images, image_positions, image_counts)
            ks, vs = [image_k, *ks], [image_v, *vs]
            key_positions, masks = [image_pos, *key_positions], [image_keep, *masks]
        masks = None if all(mask is None for mask in masks) else masks
        out = concat_attention(q, ks, vs, masks, key_positions=key_positions, query_positions=positions,
                               backend=self.backend)
        return self.o_proj(out.flatten(2))
