"""The ``sdpa`` backend: torch.nn.functional.scaled_dot_product_attention over torch.cat of the sources."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplug_kernels.backends.base import Backend
from mplug_kernels.reference import dead_queries_zeroed, joined_sources, never_empty


def masked_sources(ks, vs, masks):
    """k, v joined by torch.cat (masked rows zeroed), the keep mask [B, sum Lk] with fully masked rows reopened (or None), alive [B] (or None)."""
    k, v, keep = joined_sources(ks, vs, masks)
    if keep is None:
        return k, v, None, None
    safe_keep, alive = never_empty(keep)
    return k, v, safe_keep, alive


def zero_dead_rows(out: torch.Tensor, alive) -> torch.Tensor:
    """out [B, Lq, H, D] set to 0 (selected, so even NaN goes) where alive ([B] per batch row or [B, Lq] per query) is False."""
    if alive is None:
        return out
    return out.masked_fill(~alive.reshape(*alive.shape, *[1] * (out.dim() - alive.dim())), 0)


class SdpaBackend(Backend):
    name = "sdpa"
    devices = ("cpu", "cuda", "mps", "xpu")
    supports_lse = False
    supports_grouped_heads = True
    uses_custom_op = False

    def rank(self, call) -> int:
        return 40

    def attend(self, q, ks, vs, masks, scale):
        k, v, keep, alive = masked_sources(ks, vs, masks)
        q = dead_queries_zeroed(q, alive)
        attn_mask = None if keep is None else keep[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale,
            enable_gqa=k.shape[2] != q.shape[2],
        ).transpose(1, 2)
        return zero_dead_rows(out, alive), None
