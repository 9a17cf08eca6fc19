"""The ``sdpa`` backend: torch.nn.functional.scaled_dot_product_attention over torch.cat of the sources."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplug_kernels.backends.base import Backend
from mplug_kernels.reference import joined_keep, joined_positions, joined_sources, never_empty, visible_keys


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


def dense_visibility(ks, masks, positions):
    """The dense bool mask [B, 1, Lq or 1, sum Lk] that the padding masks [B, Lk_i] and positions (Positions or None)
    amount to, rows that see no key reopened (None when nothing is hidden), and alive [B, Lq or 1] (or None)."""
    keep = joined_keep(ks, masks)
    if positions is None and keep is None:
        return None, None
    if keep is None:
        keep = torch.ones(ks[0].shape[0], sum(k.shape[1] for k in ks), dtype=torch.bool, device=ks[0].device)
    visible = keep[:, None, :]
    if positions is not None:
        visible = visible_keys(keep, joined_positions(ks, positions.keys), positions.queries)
    safe, alive = never_empty(visible)
    return safe[:, None], alive


class SdpaBackend(Backend):
    """SDPA over torch.cat of the sources; positional visibility becomes a dense [B, 1, Lq, Lk] mask."""

    name = "sdpa"
    devices = ("cpu", "cuda", "mps", "xpu")
    supports_lse = False
    supports_grouped_heads = True
    supports_positions = True
    uses_custom_op = False

    def rank(self, call) -> int:
        return 40

    def attend(self, q, ks, vs, masks, scale, positions=None):
        k, v, _ = joined_sources(ks, vs, masks)
        attn_mask, alive = dense_visibility(ks, masks, positions)
        q = q if alive is None else q.masked_fill(~alive[:, :, None, None], 0)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale,
            enable_gqa=k.shape[2] != q.shape[2],
        ).transpose(1, 2)
        return zero_dead_rows(out, alive), None
