"""merge_attention_states: combine partial attentions over disjoint key sets by their log-sum-exp."""
from __future__ import annotations

from typing import Sequence, Tuple

import torch


def _check_states(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> None:
    if not isinstance(outs, (tuple, list)) or not isinstance(lses, (tuple, list)):
        raise TypeError("outs and lses must be tuples of tensors (one partial attention each)")
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs and lses must be non-empty and of equal length, got {len(outs)} and {len(lses)}")
    if not all(isinstance(x, torch.Tensor) for x in (*outs, *lses)):
        raise TypeError("every entry of outs and lses must be a torch.Tensor")
    first = outs[0]
    if first.dim() != 4:
        raise ValueError(f"outs[0] must be [B, Lq, H, D], got shape {tuple(first.shape)}")
    batch, q_len, heads, _ = first.shape
    for i, (out, lse) in enumerate(zip(outs, lses)):
        if out.shape != first.shape or out.dtype != first.dtype:
            raise ValueError(
                f"outs[{i}] ({tuple(out.shape)}, {out.dtype}) must be [B, Lq, H, D] like outs[0] ({tuple(first.shape)}, {first.dtype})"
            )
        if tuple(lse.shape) != (batch, heads, q_len) or not lse.is_floating_point():
            raise ValueError(f"lses[{i}] must be a float [B, H, Lq] = ({batch}, {heads}, {q_len}) tensor, got {tuple(lse.shape)} {lse.dtype}")


def merge_attention_states(
    outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Partial (out [B, Lq, H, D], lse [B, H, Lq]) over disjoint key sets -> the attention over their union; all-masked rows give 0 and -inf.

    A part whose lse is -inf (no key) is left out, whatever its out holds; a NaN stays in its own row.
    """
    _check_states(outs, lses)
    lse_dtype = torch.promote_types(torch.promote_types(lses[0].dtype, outs[0].dtype), torch.float32)
    stacked = torch.stack([lse.to(lse_dtype) for lse in lses])
    peak = stacked.detach().amax(dim=0)
    peak = torch.where(torch.isinf(peak), torch.zeros_like(peak), peak)
    weights = torch.exp(stacked - peak)
    total = weights.sum(dim=0)
    empty = total == 0
    safe_total = torch.where(empty, torch.ones_like(total), total)
    lse = torch.where(empty, torch.full_like(total, float("-inf")), peak + torch.log(safe_total))
    shares = (weights / safe_total).transpose(2, 3).unsqueeze(-1)
    empty_parts = torch.isneginf(stacked).transpose(2, 3).unsqueeze(-1)
    out = sum(
        share * part.to(lse_dtype).masked_fill(no_keys, 0) for share, part, no_keys in zip(shares, outs, empty_parts)
    )
    return out.to(outs[0].dtype), lse
