"""Input validation shared by every public op: clear errors that name the argument."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 128


def _describe(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}, device {x.device}"


def check_tensor(name: str, x, rank: int) -> None:
    """Raise TypeError/ValueError unless ``x`` is a floating tensor of the given rank."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != rank:
        raise ValueError(f"{name} must have rank {rank} ([B, S, H, D]), got {_describe(x)}")
    if x.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        raise TypeError(
            f"{name} has unsupported dtype {x.dtype}; allowed: float32, float16, bfloat16 (float64 on the reference backend)"
        )


def check_attention_inputs(
    q: torch.Tensor,
    ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]],
    k_names: Sequence[str],
    v_names: Sequence[str],
    mask_names: Sequence[str],
) -> None:
    """Validate q [B, Lq, Hq, D] against key/value sources [B, Lk_i, Hkv, D] (Hkv divides Hq, one Hkv for all) and bool masks [B, Lk_i]."""
    check_tensor("q", q, 4)
    batch, _, heads, head_dim = q.shape
    kv_heads = None
    if head_dim % 8 != 0 or head_dim > MAX_HEAD_DIM or head_dim == 0:
        raise ValueError(
            f"q has head dim {head_dim} ({_describe(q)}); allowed: a multiple of 8 up to {MAX_HEAD_DIM}"
        )
    for k, v, mask, k_name, v_name, mask_name in zip(ks, vs, masks, k_names, v_names, mask_names):
        check_tensor(k_name, k, 4)
        check_tensor(v_name, v, 4)
        for name, x in ((k_name, k), (v_name, v)):
            if x.dtype != q.dtype:
                raise TypeError(f"{name} has dtype {x.dtype} but q has {q.dtype}; they must match")
            if x.device != q.device:
                raise ValueError(f"{name} is on {x.device} but q is on {q.device}; they must match")
            if x.shape[0] != batch or x.shape[3] != head_dim:
                raise ValueError(
                    f"{name} must be [B={batch}, Lk, Hkv, D={head_dim}] to match q, got {_describe(x)}"
                )
            kv_heads = check_kv_heads(name, x.shape[2], heads, kv_heads)
        if k.shape[1] != v.shape[1]:
            raise ValueError(f"{k_name} ({_describe(k)}) and {v_name} ({_describe(v)}) differ in length")
        if k.shape[1] == 0:
            raise ValueError(f"{k_name} has no keys ({_describe(k)}); Lk must be at least 1")
        if mask is not None:
            check_mask(mask_name, mask, batch, k.shape[1], q.device)
    if q.shape[1] == 0:
        raise ValueError(f"q has no queries ({_describe(q)}); Lq must be at least 1")


def check_kv_heads(name: str, kv_heads: int, q_heads: int, expected: Optional[int]) -> int:
    """K/V heads of ``name``: they must divide q's Hq heads and equal every other source's (``expected``)."""
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise ValueError(
            f"{name} has {kv_heads} key/value heads but q has {q_heads} heads; the K/V heads must divide the query heads"
        )
    if expected is not None and kv_heads != expected:
        raise ValueError(
            f"{name} has {kv_heads} key/value heads but an earlier key/value tensor has {expected} (q has {q_heads} "
            f"heads); every source must have the same K/V heads"
        )
    return kv_heads


def check_mask(name: str, mask, batch: int, length: int, device: torch.device) -> None:
    """A key padding mask must be bool [B, Lk] on the same device as q."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must have dtype torch.bool (True = attend), got {mask.dtype}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"{name} must have shape [B, Lk] = ({batch}, {length}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but q is on {device}; they must match")


def default_scale(head_dim: int, softmax_scale: Optional[float]) -> float:
    """softmax_scale, or D ** -0.5 when None."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__} "
                        f"{softmax_scale!r}")
    if not math.isfinite(softmax_scale):
        raise ValueError(f"softmax_scale must be finite, got {softmax_scale!r}")
    return float(softmax_scale)


def check_positions(key_positions, query_positions, q: torch.Tensor, ks: Sequence[torch.Tensor],
                    key_names: Sequence[str], query_name: str = "query_positions") -> bool:
    """Validate int32 key positions [B, Lk_i] (None per source allowed) and query positions [B, Lq]: both or neither;
    True when positional visibility applies."""
    given = [p for p in key_positions if p is not None]
    if not given and query_positions is None:
        return False
    if query_positions is None:
        raise ValueError(f"{key_names[0].split('[')[0]} is given but {query_name} is None; positional visibility needs both")
    if not given:
        raise ValueError(f"{query_name} is given but no source has key positions; give them or leave both None")
    check_position_tensor(query_name, query_positions, (q.shape[0], q.shape[1]), q.device)
    for position, k, name in zip(key_positions, ks, key_names):
        if position is not None:
            check_position_tensor(name, position, (k.shape[0], k.shape[1]), q.device)
    return True


def check_position_tensor(name: str, x, shape, device: torch.device) -> None:
    """A position tensor must be int32 with ``shape`` on ``device``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor or None, got {type(x).__name__}")
    if x.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {x.dtype}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape [B, L] = {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but q is on {device}; they must match")


def check_key_lengths(name: str, lengths, batch: int, device: torch.device) -> None:
    """Key lengths must be None or an int32 tensor [B] on q's device (values are not read: that would sync the host)."""
    if lengths is None:
        return
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(f"{name} must be an int32 torch.Tensor [B] or None, got {type(lengths).__name__}")
    if lengths.dtype != torch.int32:
        raise TypeError(f"{name} must have dtype torch.int32, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(f"{name} must have shape [B] = ({batch},), got {tuple(lengths.shape)}")
    if lengths.device != device:
        raise ValueError(f"{name} is on {lengths.device} but q is on {device}; they must match")
