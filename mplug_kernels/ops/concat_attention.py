"""concat_attention: attention over the concatenation of several key/value sources, without the copy."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from mplug_kernels._checks import check_attention_inputs, check_tensor, default_scale
from mplug_kernels.ops.attention import attend

MAX_SOURCES = 4
Tensors = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


def _as_sources(name: str, sources) -> Tuple:
    if not isinstance(sources, (tuple, list)):
        raise TypeError(f"{name} must be a tuple of 1 to {MAX_SOURCES} tensors [B, Lk_i, H, D], got {type(sources).__name__}")
    if not 1 <= len(sources) <= MAX_SOURCES:
        raise ValueError(f"{name} must hold 1 to {MAX_SOURCES} sources, got {len(sources)}")
    return tuple(sources)


def _as_masks(key_padding_masks, num_sources: int) -> Tuple:
    if key_padding_masks is None:
        return (None,) * num_sources
    if not isinstance(key_padding_masks, (tuple, list)):
        raise TypeError(
            f"key_padding_masks must be None or a tuple with one bool [B, Lk_i] mask or None per source, "
            f"got {type(key_padding_masks).__name__}"
        )
    if len(key_padding_masks) != num_sources:
        raise ValueError(f"key_padding_masks has {len(key_padding_masks)} entries but there are {num_sources} key sources")
    return tuple(key_padding_masks)


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


def concat_attention(
    q: Tensors,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    key_padding_masks: Optional[Sequence[Optional[torch.Tensor]]] = None,
    *,
    softmax_scale: Optional[float] = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """q [B, Lq, H, D] (or a tuple of them) attends to cat(ks), cat(vs) ([B, Lk_i, H, D] each, masks bool [B, Lk_i]) -> out (, lse [B, H, Lq]), tuples when q is."""
    queries = tuple(q) if isinstance(q, (tuple, list)) else (q,)
    if not queries:
        raise ValueError("q must be a tensor [B, Lq, H, D] or a non-empty tuple of them")
    ks, vs = _as_sources("ks", ks), _as_sources("vs", vs)
    if len(ks) != len(vs):
        raise ValueError(f"ks has {len(ks)} sources but vs has {len(vs)}; they must match")
    masks = _as_masks(key_padding_masks, len(ks))
    _check_queries(queries)
    indices = range(len(ks))
    check_attention_inputs(
        queries[0], ks, vs, masks, [f"ks[{i}]" for i in indices], [f"vs[{i}]" for i in indices],
        [f"key_padding_masks[{i}]" for i in indices],
    )
    scale = default_scale(queries[0].shape[-1], softmax_scale)
    results = tuple(attend(query, ks, vs, masks, scale, return_lse, backend) for query in queries)
    if not isinstance(q, (tuple, list)):
        return results[0]
    if return_lse:
        return tuple(out for out, _ in results), tuple(lse for _, lse in results)
    return results
