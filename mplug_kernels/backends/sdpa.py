"""The ``sdpa`` backend: torch.nn.functional.scaled_dot_product_attention over torch.cat of the sources."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mplug_kernels.backends.base import Backend


def joined_sources(ks, vs, masks):
    """k, v [B, sum Lk, H, D] and the bool keep mask [B, sum Lk] (None when nothing is masked)."""
    k = ks[0] if len(ks) == 1 else torch.cat(list(ks), dim=1)
    v = vs[0] if len(vs) == 1 else torch.cat(list(vs), dim=1)
    if all(m is None for m in masks):
        return k, v, None
    keep = torch.cat(
        [m if m is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) for m, x in zip(masks, ks)],
        dim=1,
    )
    return k, v, keep


def never_empty(keep):
    """(keep with fully masked rows reopened, alive [B]): zero the output of rows where alive is False."""
    alive = keep.any(dim=1)
    return keep | ~alive[:, None], alive


class SdpaBackend(Backend):
    name = "sdpa"
    devices = ("cpu", "cuda", "mps", "xpu")
    supports_lse = False
    uses_custom_op = False

    def rank(self, call) -> int:
        return 40

    def attend(self, q, ks, vs, masks, scale):
        k, v, keep = joined_sources(ks, vs, masks)
        attn_mask = None
        alive = None
        if keep is not None:
            safe_keep, alive = never_empty(keep)
            attn_mask = safe_keep[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask, scale=scale
        ).transpose(1, 2)
        if alive is not None:
            out = out * alive[:, None, None, None].to(out.dtype)
        return out, None
