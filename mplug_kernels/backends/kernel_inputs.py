"""What the Triton and CUDA kernel backends and their launch code share: the split-KV override, mask preparation
and whether Triton runs under its CPU interpreter. Imports no other mplug_kernels module, so the ops and the
backends can both use it."""
from __future__ import annotations

import os
from typing import Optional

import torch

MAX_SPLITS = 64
_forced_num_splits: Optional[int] = None


def interpreter_on() -> bool:
    """True when TRITON_INTERPRET=1, so Triton kernels run on the CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def force_num_splits(num_splits: Optional[int]) -> None:
    """Pin the split-KV count of the Triton and CUDA forwards (None restores their heuristics); for tests and tuning."""
    global _forced_num_splits
    if num_splits is not None and not 1 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"num_splits must be in 1..{MAX_SPLITS} or None, got {num_splits}")
    _forced_num_splits = num_splits


def forced_num_splits() -> Optional[int]:
    """The pinned split-KV count, or None when the kernels choose."""
    return _forced_num_splits


def unit_stride_rows(rows: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """rows [B, L] with a unit stride along L (a copy only when it is strided); None stays None."""
    return rows if rows is None or rows.stride(-1) == 1 else rows.contiguous()


def mask_bytes(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A bool [B, Lk] key mask as a uint8 view with a contiguous key axis (a copy only when it is strided)."""
    rows = unit_stride_rows(mask)
    return None if rows is None else rows.view(torch.uint8)
