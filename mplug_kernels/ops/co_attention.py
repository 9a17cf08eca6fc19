"""co_attention: short text queries attending to a long visual key/value sequence."""
from __future__ import annotations

from typing import Optional

import torch

from mplug_kernels._checks import check_attention_inputs, check_key_lengths, check_positions, default_scale
from mplug_kernels.backends.base import Positions
from mplug_kernels.ops.attention import attend


def padding_with_lengths(name: str, mask: Optional[torch.Tensor], lengths: Optional[torch.Tensor], q: torch.Tensor,
                         k: torch.Tensor) -> Optional[torch.Tensor]:
    """mask [B, Lk] (or None) & (key j < lengths[b]) for int32 lengths [B] (or None), built on the device without a
    host sync: a length below 0 keeps no key, one above Lk keeps every key."""
    check_key_lengths(name, lengths, q.shape[0], q.device)
    if lengths is None:
        return mask
    kept = torch.arange(k.shape[1], device=k.device, dtype=torch.int32)[None, :] < lengths[:, None]
    return kept if mask is None else mask & kept


def co_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    key_positions: Optional[torch.Tensor] = None,
    query_positions: Optional[torch.Tensor] = None,
    key_lengths: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """q [B, Lq, H, D] attends to k, v [B, Lk, H, D] (mask bool [B, Lk], True = attend; key j visible to query t only
    if key_positions[b, j] <= query_positions[b, t], int32 [B, Lk] / [B, Lq]; and only if j < key_lengths[b], int32 [B],
    clamped to [0, Lk], a decode cache's valid length) -> out [B, Lq, H, D] (, lse [B, H, Lq])."""
    check_attention_inputs(q, [k], [v], [key_padding_mask], ["k"], ["v"], ["key_padding_mask"])
    key_padding_mask = padding_with_lengths("key_lengths", key_padding_mask, key_lengths, q, k)
    has_positions = check_positions([key_positions], query_positions, q, [k], ["key_positions"])
    positions = Positions((key_positions,), query_positions) if has_positions else None
    scale = default_scale(q.shape[-1], softmax_scale)
    return attend(q, [k], [v], [key_padding_mask], scale, return_lse, backend, positions)
