"""Optional third-party baselines (flash-attn, xformers): imported lazily, never required."""
from __future__ import annotations

import importlib
from functools import lru_cache
from typing import Optional

import torch

from mplug_kernels.backends.base import Backend
from mplug_kernels.backends.sdpa import masked_sources, zero_dead_rows
from mplug_kernels.reference import dead_queries_zeroed, joined_sources


@lru_cache(maxsize=None)
def _import_reason(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as error:  # an installed-but-broken wheel raises more than ImportError
        return f"{module} not importable ({type(error).__name__}: {error})"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


class FlashAttnBackend(Backend):
    """flash_attn_func over torch.cat of the sources; no key padding mask, no lse."""

    name = "flash_attn"
    dtypes = (torch.float16, torch.bfloat16)
    supports_lse = False
    supports_mask = False
    supports_grouped_heads = True
    uses_custom_op = False

    def unavailable_reason(self):
        return _import_reason("flash_attn")

    def rank(self, call) -> int:
        return 20

    def attend(self, q, ks, vs, masks, scale, positions=None):
        from flash_attn import flash_attn_func

        k, v, _ = joined_sources(ks, vs, masks)
        return flash_attn_func(q, k, v, softmax_scale=scale), None


class XFormersBackend(Backend):
    """xformers.ops.memory_efficient_attention with the padding mask as an additive bias; no lse."""

    name = "xformers"
    supports_lse = False
    uses_custom_op = False

    def unavailable_reason(self):
        return _import_reason("xformers.ops")

    def rank(self, call) -> int:
        return 30

    def attend(self, q, ks, vs, masks, scale, positions=None):
        import xformers.ops as xops

        k, v, keep, alive = masked_sources(ks, vs, masks)
        q = dead_queries_zeroed(q, alive)
        bias = None
        if keep is not None:
            bias = torch.zeros(keep.shape, dtype=q.dtype, device=q.device).masked_fill(~keep, float("-inf"))
            bias = bias[:, None, None, :].expand(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scale)
        return zero_dead_rows(out, alive), None
