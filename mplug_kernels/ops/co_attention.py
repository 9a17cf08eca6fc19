"""co_attention: short text queries attending to a long visual key/value sequence."""
from __future__ import annotations

from typing import Optional

import torch

from mplug_kernels._checks import check_attention_inputs, check_positions, default_scale
from mplug_kernels.backends.base import Positions
from mplug_kernels.ops.attention import attend


def co_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: Optional[torch.Tensor] = None,
    *,
    key_positions: Optional[torch.Tensor] = None,
    query_positions: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """q [B, Lq, H, D] attends to k, v [B, Lk, H, D] (mask bool [B, Lk], True = attend; key j visible to query t only
    if key_positions[b, j] <= query_positions[b, t], int32 [B, Lk] / [B, Lq]) -> out [B, Lq, H, D] (, lse [B, H, Lq])."""
    check_attention_inputs(q, [k], [v], [key_padding_mask], ["k"], ["v"], ["key_padding_mask"])
    has_positions = check_positions([key_positions], query_positions, q, [k], ["key_positions"])
    positions = Positions((key_positions,), query_positions) if has_positions else None
    scale = default_scale(q.shape[-1], softmax_scale)
    return attend(q, [k], [v], [key_padding_mask], scale, return_lse, backend, positions)
