"""The one attention op behind co_attention and concat_attention, registered with torch.library.

``mplug_kernels::attention_forward`` computes (out, lse) of q [B, Lq, H, D] attending to up to four
key/value sources [B, Lk_i, H, D] with bool key padding masks [B, Lk_i] and optional positional visibility
(int32 key positions [B, Lk_i] per source, query positions [B, Lq]), on a named kernel backend.
Its backward is ``mplug_kernels::attention_backward``; both have fake implementations so that
torch.compile and FSDP trace through them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from mplug_kernels.backends import AttentionCall, get_backend, select_backend
from mplug_kernels.backends.base import Positions
from mplug_kernels.profiling import nvtx_range


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


@torch.library.custom_op("mplug_kernels::attention_forward", mutates_args=())
def attention_forward(
    q: torch.Tensor,
    ks: List[torch.Tensor],
    vs: List[torch.Tensor],
    present_masks: List[torch.Tensor],
    mask_bits: int,
    present_key_positions: List[torch.Tensor],
    position_bits: int,
    query_positions: Optional[torch.Tensor],
    softmax_scale: float,
    backend: str,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] and lse [B, H, Lq] on the kernel backend named ``backend``."""
    masks = _masks_per_source(len(ks), present_masks, mask_bits)
    positions = _positions(len(ks), present_key_positions, position_bits, query_positions)
    out, lse = get_backend(backend).forward(q, ks, vs, masks, softmax_scale, positions)
    return out.contiguous(), lse.contiguous()


@attention_forward.register_fake
def _attention_forward_fake(q, ks, vs, present_masks, mask_bits, present_key_positions, position_bits, query_positions,
                            softmax_scale, backend):
    batch, q_len, heads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, heads, q_len), dtype=_lse_dtype(q))


@torch.library.custom_op("mplug_kernels::attention_backward", mutates_args=())
def attention_backward(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    ks: List[torch.Tensor],
    vs: List[torch.Tensor],
    present_masks: List[torch.Tensor],
    mask_bits: int,
    present_key_positions: List[torch.Tensor],
    position_bits: int,
    query_positions: Optional[torch.Tensor],
    out: torch.Tensor,
    lse: torch.Tensor,
    softmax_scale: float,
    backend: str,
    deterministic: bool,
) -> List[torch.Tensor]:
    """[dq, *dks, *dvs] for attention_forward's inputs."""
    masks = _masks_per_source(len(ks), present_masks, mask_bits)
    positions = _positions(len(ks), present_key_positions, position_bits, query_positions)
    dq, dks, dvs = get_backend(backend).backward(
        dout, dlse, q, ks, vs, masks, out, lse, softmax_scale, deterministic, positions
    )
    return [grad.contiguous() for grad in (dq, *dks, *dvs)]


@attention_backward.register_fake
def _attention_backward_fake(dout, dlse, q, ks, vs, present_masks, mask_bits, present_key_positions, position_bits,
                             query_positions, out, lse, softmax_scale, backend, deterministic):
    return [x.new_empty(x.shape) for x in (q, *ks, *vs)]


def _masks_per_source(num_sources: int, present_masks, mask_bits: int) -> List[Optional[torch.Tensor]]:
    """Rebuild one mask (or None) per source; bit i of mask_bits says source i has a mask."""
    present = iter(present_masks)
    return [next(present) if mask_bits >> i & 1 else None for i in range(num_sources)]


def _positions(num_sources: int, present_key_positions, position_bits: int, query_positions) -> Optional[Positions]:
    """Positions (key positions per source, bit i of position_bits = source i has them) or None without query_positions."""
    if query_positions is None:
        return None
    return Positions(tuple(_masks_per_source(num_sources, present_key_positions, position_bits)), query_positions)


def _present(per_source: Sequence[Optional[torch.Tensor]]) -> Tuple[List[torch.Tensor], int]:
    """(the tensors that are not None, bit i set where source i has one)."""
    return [x for x in per_source if x is not None], sum(1 << i for i, x in enumerate(per_source) if x is not None)


def _setup_context(ctx, inputs, output):
    q, ks, vs, present_masks, mask_bits, present_key_positions, position_bits, query_positions, softmax_scale, backend = inputs
    out, lse = output
    ctx.num_sources = len(ks)
    ctx.num_masks, ctx.num_key_positions = len(present_masks), len(present_key_positions)
    ctx.mask_bits, ctx.position_bits = mask_bits, position_bits
    ctx.has_query_positions = query_positions is not None
    extra = [query_positions] if query_positions is not None else []
    ctx.save_for_backward(q, *ks, *vs, *present_masks, *present_key_positions, *extra, out, lse)
    ctx.softmax_scale = softmax_scale
    ctx.backend = backend


def _backward(ctx, dout, dlse):
    saved = list(ctx.saved_tensors)
    n = ctx.num_sources
    q, ks, vs = saved[0], saved[1 : 1 + n], saved[1 + n : 1 + 2 * n]
    rest = saved[1 + 2 * n : -2]
    present_masks, present_key_positions = rest[: ctx.num_masks], rest[ctx.num_masks : ctx.num_masks + ctx.num_key_positions]
    query_positions = rest[-1] if ctx.has_query_positions else None
    out, lse = saved[-2], saved[-1]
    if dout is None:
        dout = torch.zeros_like(out)
    grads = attention_backward(
        dout.contiguous(),
        dlse,
        q,
        ks,
        vs,
        present_masks,
        ctx.mask_bits,
        present_key_positions,
        ctx.position_bits,
        query_positions,
        out,
        lse,
        ctx.softmax_scale,
        ctx.backend,
        torch.are_deterministic_algorithms_enabled(),
    )
    no_grads = [None] * len(present_masks), None, [None] * len(present_key_positions), None, None, None, None
    return grads[0], grads[1 : 1 + n], grads[1 + n :], *no_grads


torch.library.register_autograd("mplug_kernels::attention_forward", _backward, setup_context=_setup_context)


def attention_op(q, ks, vs, masks, softmax_scale: float, backend: str, positions: Optional[Positions] = None):
    """Autograd-aware (out, lse) through the registered custom op (None masks and positions are left out of its inputs)."""
    present_masks, mask_bits = _present(masks)
    key_positions, query_positions = (positions.keys, positions.queries) if positions is not None else ([], None)
    present_key_positions, position_bits = _present(key_positions)
    return attention_forward(q, ks, vs, present_masks, mask_bits, present_key_positions, position_bits, query_positions,
                             softmax_scale, backend)


def attend(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    softmax_scale: float,
    return_lse: bool,
    backend: str,
    positions: Optional[Positions] = None,
):
    """Dispatch q attending to the sources to ``backend`` ('auto' picks); returns out or (out, lse)."""
    call = AttentionCall.of(q, ks, vs, masks, return_lse, positions)
    chosen = select_backend(backend, call)
    with nvtx_range(f"attention.{chosen.name}"):
        if chosen.uses_custom_op:
            out, lse = attention_op(q, list(ks), list(vs), list(masks), softmax_scale, chosen.name, positions)
        else:
            out, lse = chosen.attend(q, ks, vs, masks, softmax_scale, positions)
    return (out, lse) if return_lse else out
