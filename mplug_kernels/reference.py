"""Plain PyTorch attention over several key/value sources: the ground truth for every backend.

Computed in float32 (float64 when the inputs are float64). Layout [B, S, H, D] everywhere.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def joined_keep(ks: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """The bool keep mask [B, sum Lk] of the sources (ks [B, Lk_i, H, D], masks [B, Lk_i] or None); None when nothing is masked."""
    if all(m is None for m in masks):
        return None
    return torch.cat(
        [m if m is not None else torch.ones(x.shape[:2], dtype=torch.bool, device=x.device) for m, x in zip(masks, ks)],
        dim=1,
    )


def joined_sources(
    ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """torch.cat of the sources: k, v [B, sum Lk, H, D] with masked rows set to 0 (so no value there, NaN
    included, reaches the output) and the bool keep mask [B, sum Lk] (None when nothing is masked)."""
    k = ks[0] if len(ks) == 1 else torch.cat(list(ks), dim=1)
    v = vs[0] if len(vs) == 1 else torch.cat(list(vs), dim=1)
    keep = joined_keep(ks, masks)
    if keep is None:
        return k, v, None
    hidden = ~keep[:, :, None, None]
    return k.masked_fill(hidden, 0), v.masked_fill(hidden, 0), keep


def never_empty(keep: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(keep [..., Lk] with fully masked rows reopened, alive [...]): the caller zeroes the output where alive is False."""
    alive = keep.any(dim=-1)
    return keep | ~alive[..., None], alive


def dead_queries_zeroed(q: torch.Tensor, alive: Optional[torch.Tensor]) -> torch.Tensor:
    """q [B, ...] with the rows of batch elements that keep no key (alive [B] False) set to 0: their output is 0 whatever q holds."""
    if alive is None:
        return q
    return q.masked_fill(~alive.reshape(-1, *[1] * (q.dim() - 1)), 0)


def alive_batch_rows(ks: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]]) -> Optional[torch.Tensor]:
    """alive [B]: whether batch element b keeps any key of the sources (ks [B, Lk_i, H, D], masks [B, Lk_i]); None when all do."""
    if any(mask is None and k.shape[1] > 0 for k, mask in zip(ks, masks)):
        return None
    alive = torch.zeros(ks[0].shape[0], dtype=torch.bool, device=ks[0].device)
    for mask in masks:
        if mask is not None and mask.shape[1] > 0:
            alive = alive | mask.any(dim=1)
    return alive


def joined_positions(ks: Sequence[torch.Tensor], key_positions: Optional[Sequence[Optional[torch.Tensor]]]) -> Optional[torch.Tensor]:
    """int64 [B, sum Lk]: each key's position (ks [B, Lk_i, H, D], key_positions int32 [B, Lk_i] or None per source),
    the lowest int64 for a source without positions (visible to every query); None when no source has positions."""
    if key_positions is None or all(p is None for p in key_positions):
        return None
    lowest = torch.iinfo(torch.int64).min
    return torch.cat([
        p.to(torch.int64) if p is not None else torch.full(k.shape[:2], lowest, dtype=torch.int64, device=k.device)
        for p, k in zip(key_positions, ks)
    ], dim=1)


def visible_keys(keep: torch.Tensor, key_positions: Optional[torch.Tensor], query_positions: Optional[torch.Tensor]) -> torch.Tensor:
    """bool [B, Lq, Lk] (or [B, 1, Lk] without positions): key j is visible to query t iff keep[b, j] (keep [B, Lk])
    and key_positions[b, j] <= query_positions[b, t] (int [B, Lk] and [B, Lq])."""
    if key_positions is None:
        return keep[:, None, :]
    return keep[:, None, :] & (key_positions[:, None, :] <= query_positions.to(torch.int64)[:, :, None])


def _joined_inputs(q, ks, vs, masks, dtype, positions) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) in dtype with masked keys and dead query rows zeroed, the padding keep mask [B, sum Lk] and the
    visibility [B, Lq or 1, sum Lk] (positions: (key_positions per source, query_positions [B, Lq]) or None)."""
    k, v, keep = joined_sources(ks, vs, masks)
    if keep is None:
        keep = torch.ones(k.shape[:2], dtype=torch.bool, device=k.device)
    key_pos, query_pos = (None, None) if positions is None else (joined_positions(ks, positions[0]), positions[1])
    visible = visible_keys(keep, key_pos, query_pos)
    alive = visible.any(dim=-1)[:, :, None, None]
    return q.to(dtype).masked_fill(~alive, 0), k.to(dtype), v.to(dtype), keep, visible


def grouped_heads(x: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """x [B, L, Hq, ...] as [B, L, Hkv, Hq // Hkv, ...] (a view): query head h belongs to K/V head h // (Hq // Hkv)."""
    return x.unflatten(2, (kv_heads, x.shape[2] // kv_heads))


def _probabilities(q, k, visible, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities [B, Hkv, G, Lq, Lk] of grouped q [B, Lq, Hkv, G, D] under visible [B, Lq or 1, Lk] and
    natural-log lse [B, Hq, Lq]; query rows that see no key give P = 0, lse = -inf.

    Rows with no key left are computed on zero scores and then zeroed, so gradients stay finite.
    """
    alive = visible.any(dim=-1)[:, None, None, :, None]
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k) * scale
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    scores = scores.masked_fill(~alive, 0)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None]).masked_fill(~alive, 0)
    return probs, lse.masked_fill(~alive[..., 0], float("-inf")).flatten(1, 2)


def attention_forward(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    scale: float,
    positions: Optional[Tuple[Sequence[Optional[torch.Tensor]], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, Hq, D] (q's dtype) and lse [B, Hq, Lq] of q attending to the concatenated sources [B, Lk_i, Hkv, D]
    (positions: (key_positions per source, query_positions), see visible_keys)."""
    qc, k, v, _, visible = _joined_inputs(q, ks, vs, masks, _compute_dtype(q.dtype), positions)
    probs, lse = _probabilities(grouped_heads(qc, k.shape[2]), k, visible, scale)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v).flatten(2, 3)
    return out.to(q.dtype), lse


def attention_backward(
    dout: torch.Tensor,
    dlse: Optional[torch.Tensor],
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    positions: Optional[Tuple[Sequence[Optional[torch.Tensor]], torch.Tensor]] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """Closed-form gradients (dq, dks, dvs) given dout [B, Lq, Hq, D] and dlse [B, Hq, Lq] (or None); dK/dV
    [B, Lk_i, Hkv, D] sum over each K/V head's group of query heads."""
    dtype = _compute_dtype(q.dtype)
    qc, k, v, keep, visible = _joined_inputs(q, ks, vs, masks, dtype, positions)
    kv_heads = k.shape[2]
    qg, doc = grouped_heads(qc, kv_heads), grouped_heads(dout.to(dtype), kv_heads)
    probs, _ = _probabilities(qg, k, visible, scale)
    delta = (dout.to(dtype) * out.to(dtype)).sum(-1).transpose(1, 2)
    if dlse is not None:
        delta = delta - dlse.to(dtype)
    delta = delta.unflatten(1, (kv_heads, -1))
    dprobs = torch.einsum("bqhgd,bkhd->bhgqk", doc, v)
    dscores = probs * (dprobs - delta[..., None])
    dq = torch.einsum("bhgqk,bkhd->bqhgd", dscores, k).flatten(2, 3) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", dscores, qg) * scale
    dv = torch.einsum("bhgqk,bqhgd->bkhd", probs, doc)
    hidden = ~keep[:, :, None, None]
    dk, dv = dk.masked_fill(hidden, 0), dv.masked_fill(hidden, 0)
    lengths = [x.shape[1] for x in ks]
    dks = [g.to(x.dtype, copy=True) for g, x in zip(dk.split(lengths, dim=1), ks)]
    dvs = [g.to(x.dtype, copy=True) for g, x in zip(dv.split(lengths, dim=1), vs)]
    return dq.to(q.dtype), dks, dvs
