"""concat_attention: attention over the concatenation of several key/value sources, without the copy."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from mplug_kernels._checks import check_attention_inputs, check_positions, check_tensor, default_scale
from mplug_kernels.backends.base import Positions
from mplug_kernels.ops.attention import attend
from mplug_kernels.ops.co_attention import padding_with_lengths

MAX_SOURCES = 4
Tensors = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _as_sources(name: str, sources) -> Tuple:
    if not isinstance(sources, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of 1 to {MAX_SOURCES} tensors [B, Lk_i, H, D], got {type(sources).__name__}")
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"{name} must hold 1 to {MAX_SOURCES} sources, got {len(sources)}")
    return tuple(sources)


def _per_source(name: str, what: str, values, num_sources: int) -> Tuple:
    """values (None, or a tuple with one ``what`` or None per source) as a tuple of num_sources entries."""
    if values is None:
        return (None,) * num_sources
    if not isinstance(values, (tuple, list)):
        raise TypeError(f"{name} must be None or a tuple with one {what} or None per source, got {type(values).__name__}")
    if len(values) != num_sources:
        raise ValueError(f"{name} has {len(values)} entries but there are {num_sources} key sources")
    return tuple(values)


def _query_positions(query_positions, queries: Tuple, is_tuple: bool) -> Tuple:
    """One query_positions entry per query tensor: a tuple when q is a tuple, else the one tensor (or None)."""
    if not is_tuple or query_positions is None:
        return (query_positions,) * len(queries)
    if not isinstance(query_positions, (tuple, list)) or len(query_positions) != len(queries):
        raise ValueError(f"q is a tuple of {len(queries)} tensors, so query_positions must be a tuple of as many int32 "
                         f"[B, Lq_i] tensors, got {type(query_positions).__name__}")
    return tuple(query_positions)


def _check_queries(queries: Sequence[torch.Tensor]) -> None:
    """Every query source is [B, Lq_i, H, D] with q[0]'s B, H, D, dtype and device."""
    first = queries[0]
    for i, query in enumerate(queries):
        check_tensor(f"q[{i}]", query, 4)
        same_layout = query.shape[0] == first.shape[0] and query.shape[2:] == first.shape[2:]
        if not same_layout or query.dtype != first.dtype or query.device != first.device:
            raise ValueError(
                f"q[{i}] ({tuple(query.shape)}, {query.dtype}, {query.device}) must match q[0] "
                f"({tuple(first.shape)}, {first.dtype}, {first.device}) in B, H, D, dtype and device"
            )
        if query.shape[1] == 0:
            raise ValueError(f"q[{i}] has no queries (shape {tuple(query.shape)}); Lq must be at least 1")


def _positions(query: torch.Tensor, ks, key_positions: Tuple, query_positions) -> Optional[Positions]:
    names = [f"key_positions[{i}]" for i in range(len(ks))]
    return Positions(key_positions, query_positions) if check_positions(key_positions, query_positions, query, ks, names) else None


def concat_attention(
    q: Tensors,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    key_padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    key_positions: Optional[Sequence[Optional[torch.Tensor]]] = None,
    query_positions=None,
    key_lengths: Optional[Sequence[Optional[torch.Tensor]]] = None,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """q [B, Lq, H, D] (or a tuple of them) attends to cat(ks), cat(vs) ([B, Lk_i, H, D] each, masks bool [B, Lk_i]) -> out (, lse [B, H, Lq]), tuples when q is.

    Positional visibility: key j of source i is visible to query t iff key_positions[i][b, j] <= query_positions[b, t]
    (int32 [B, Lk_i], None = visible to every query; int32 [B, Lq], a tuple when q is) and its padding mask allows it.
    Causal text: both positions are the token index. mPLUG-Owl3 images: an image's keys carry the text position of
    the image, text keys their index. Prefix-LM: prefix keys carry position 0, the rest their index. A query that sees
    no key gets zeros and lse -inf.

    key_lengths (one int32 [B] tensor or None per source) keeps key j of source i only if j < key_lengths[i][b]
    (a decode cache's valid length per batch row, clamped to [0, Lk_i]; combined with its padding mask).
    """
    queries = tuple(q) if isinstance(q, (tuple, list)) else (q,)
    if not queries:
        raise ValueError("q must be a tensor [B, Lq, H, D] or a non-empty tuple of them")
    ks, vs = _as_sources("ks", ks), _as_sources("vs", vs)
    if len(ks) != len(vs):
        raise ValueError(f"ks has {len(ks)} sources but vs has {len(vs)}; they must match")
    masks = _per_source("key_padding_masks", "bool [B, Lk_i] mask", key_padding_masks, len(ks))
    key_positions = _per_source("key_positions", "int32 [B, Lk_i] tensor", key_positions, len(ks))
    lengths = _per_source("key_lengths", "int32 [B] tensor", key_lengths, len(ks))
    _check_queries(queries)
    indices = range(len(ks))
    check_attention_inputs(
        queries[0], ks, vs, masks, [f"ks[{i}]" for i in indices], [f"vs[{i}]" for i in indices],
        [f"key_padding_masks[{i}]" for i in indices],
    )
    masks = tuple(padding_with_lengths(f"key_lengths[{i}]", masks[i], lengths[i], queries[0], ks[i]) for i in indices)
    per_query = _query_positions(query_positions, queries, isinstance(q, (tuple, list)))
    positions = [_positions(query, ks, key_positions, query_pos) for query, query_pos in zip(queries, per_query)]
    scale = default_scale(queries[0].shape[-1], softmax_scale)
    results = tuple(attend(query, ks, vs, masks, scale, return_lse, backend, pos) for query, pos in zip(queries, positions))
    if not isinstance(q, (tuple, list)):
        return results[0]
    if return_lse:
        return tuple(out for out, _ in results), tuple(lse for _, lse in results)
    return results
