"""Triton kernels for short queries attending to up to four long key/value sources.

Forward: one program per (query tile of at most 64 rows, batch*head, split). A program walks the
key sources in turn with one running softmax over its slice of the virtual concatenation of all
sources; with several splits (split-KV, for small B*H) the partial outputs and their log-sum-exp
are merged by a combine kernel. Backward: a dK/dV kernel per source (dQ by atomics, or a separate
deterministic dQ kernel). Layout [B, S, H, D] with any strides (last dim contiguous); offsets 64-bit.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from mplug_kernels.backends.triton import interpreter_on
from mplug_kernels.backends.kernel_inputs import MAX_SPLITS, forced_num_splits, mask_bytes

LOG2E = 1.4426950408889634
MAX_SOURCES = 4


@triton.jit
def _load_rows(base, offs_rows, stride_rows, offs_d, rows_ok, head_dim):
    """A [rows, BLOCK_D] tile of one (batch, head) slice; zero outside the valid rows and the head dim."""
    return tl.load(base + offs_rows[:, None] * stride_rows + offs_d[None, :],
                   mask=rows_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _load_key_tile(
    K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    offs_n, in_range, offs_d, head_dim, HAS_MASK: tl.constexpr,
):
    """k, v tiles [BLOCK_N, BLOCK_D] and which of their keys may be attended (in range and not padding)."""
    k = _load_rows(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, in_range, head_dim)
    v = _load_rows(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_d, in_range, head_dim)
    key_ok = in_range
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_mb + offs_n, mask=in_range, other=0)
        key_ok = key_ok & (keep != 0)
    return k, v, key_ok


@triton.jit
def _load_query_tile(
    Q, DO, LSE, DELTA, b, h, bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    offs_m, q_len, offs_d, head_dim,
):
    """q, dO tiles [BLOCK_M, BLOCK_D], their lse and delta rows, and which rows exist (backward)."""
    row_ok = offs_m < q_len
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)
    do = _load_rows(DO + b * stride_dob + h * stride_doh, offs_m, stride_dom, offs_d, row_ok, head_dim)
    lse = tl.load(LSE + bh * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * q_len + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta, row_ok


@triton.jit
def _attend_source(
    acc, m_i, l_i, q, K, V, MASK,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    lo, hi, b, h, offs_d, head_dim, qk_scale,
    HAS_MASK: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold keys [lo, hi) of one source into the running (acc, m_i, l_i); scores in log2 units."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        k, v, key_ok = _load_key_tile(K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                      stride_vh, stride_mb, offs_n, offs_n < hi, offs_d, head_dim, HAS_MASK)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _source_range(split_lo, split_hi, offset, length):
    lo = tl.minimum(tl.maximum(split_lo - offset, 0), length)
    hi = tl.minimum(tl.maximum(split_hi - offset, 0), length)
    return lo, hi


@triton.jit
def _forward_kernel(
    Q, OUT, LSE, PART_OUT, PART_LSE,
    K0, V0, M0, K1, V1, M1, K2, V2, M2, K3, V3, M3,
    stride_qb, stride_qm, stride_qh,
    stride_ob, stride_om, stride_oh,
    ks0b, ks0n, ks0h, vs0b, vs0n, vs0h, ms0,
    ks1b, ks1n, ks1h, vs1b, vs1n, vs1h, ms1,
    ks2b, ks2n, ks2h, vs2b, vs2n, vs2h, ms2,
    ks3b, ks3n, ks3h, vs3b, vs3n, vs3h, ms3,
    L0, L1, L2, L3,
    num_heads, q_len, head_dim, split_size, qk_scale,
    NUM_SOURCES: tl.constexpr, HAS_M0: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
    HAS_M3: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_split = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = _load_rows(Q + b * stride_qb + h * stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    split_lo = pid_split * split_size
    split_hi = split_lo + split_size
    lo, hi = _source_range(split_lo, split_hi, 0, L0)
    acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K0, V0, M0, ks0b, ks0n, ks0h, vs0b, vs0n, vs0h, ms0,
                                   lo, hi, b, h, offs_d, head_dim, qk_scale, HAS_M0, BLOCK_N, PRECISION)
    if NUM_SOURCES > 1:
        lo, hi = _source_range(split_lo, split_hi, L0, L1)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K1, V1, M1, ks1b, ks1n, ks1h, vs1b, vs1n, vs1h, ms1,
                                       lo, hi, b, h, offs_d, head_dim, qk_scale, HAS_M1, BLOCK_N, PRECISION)
    if NUM_SOURCES > 2:
        lo, hi = _source_range(split_lo, split_hi, L0 + L1, L2)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K2, V2, M2, ks2b, ks2n, ks2h, vs2b, vs2n, vs2h, ms2,
                                       lo, hi, b, h, offs_d, head_dim, qk_scale, HAS_M2, BLOCK_N, PRECISION)
    if NUM_SOURCES > 3:
        lo, hi = _source_range(split_lo, split_hi, L0 + L1 + L2, L3)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K3, V3, M3, ks3b, ks3n, ks3h, vs3b, vs3n, vs3h, ms3,
                                       lo, hi, b, h, offs_d, head_dim, qk_scale, HAS_M3, BLOCK_N, PRECISION)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    d_ok = offs_d[None, :] < head_dim
    if SPLIT:
        row = (pid_split * tl.num_programs(1) + pid_bh) * q_len + offs_m
        tl.store(PART_OUT + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(PART_LSE + row, lse, mask=row_ok)
    else:
        o_ptrs = OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :]
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        tl.store(LSE + pid_bh * q_len + offs_m, lse, mask=row_ok)


FORWARD_CONFIGS = [
    triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    for block_n in (64, 128)
    for warps in (4, 8)
    for stages in (2, 3, 4)
]
# MPLUG_KERNELS_TRITON_AUTOTUNE=0 runs the forward with this one configuration instead of tuning (GPU test
# runs, where tuning every new shape would cost more than the tests; every configuration has its own test).
AUTOTUNE_ENV = "MPLUG_KERNELS_TRITON_AUTOTUNE"
UNTUNED_META = {"BLOCK_N": 64, "num_warps": 4, "num_stages": 2}

_tuned_forward_kernel = triton.autotune(
    configs=FORWARD_CONFIGS,
    key=["q_len", "head_dim", "split_size", "NUM_SOURCES", "SPLIT", "BLOCK_M", "BLOCK_D"],
)(_forward_kernel)


def config_meta(config: triton.Config) -> dict:
    """The launch keyword arguments of one forward configuration."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _forward_launcher():
    """The autotuned kernel on a GPU; one fixed configuration under the CPU interpreter (tuning there is
    meaningless) or with MPLUG_KERNELS_TRITON_AUTOTUNE=0."""
    if interpreter_on():
        return _forward_kernel, {"BLOCK_N": 64}
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return _forward_kernel, dict(UNTUNED_META)
    return _tuned_forward_kernel, {}


@triton.jit
def _combine_kernel(
    PART_OUT, PART_LSE, OUT, LSE,
    stride_ob, stride_om, stride_oh,
    num_heads, q_len, head_dim, num_bh, num_splits,
    SPLITS_POW2: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the split partial outputs of one query row by their log-sum-exp."""
    row_id = tl.program_id(0).to(tl.int64)
    bh = row_id // q_len
    m = row_id % q_len
    b = bh // num_heads
    h = bh % num_heads
    splits = tl.arange(0, SPLITS_POW2)
    split_ok = splits < num_splits
    rows = (splits.to(tl.int64) * num_bh + bh) * q_len + m
    lses = tl.load(PART_LSE + rows, mask=split_ok, other=float("-inf"))
    lse_max = tl.max(lses, 0)
    max_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp(lses - max_safe)
    total = tl.sum(weights, 0)
    offs_d = tl.arange(0, BLOCK_D)
    parts = tl.load(PART_OUT + rows[:, None] * BLOCK_D + offs_d[None, :], mask=split_ok[:, None], other=0.0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    lse = tl.where(total == 0.0, float("-inf"), max_safe + tl.log(tl.where(total == 0.0, 1.0, total)))
    o_ptrs = OUT + b * stride_ob + h * stride_oh + m * stride_om + offs_d
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=offs_d < head_dim)
    tl.store(LSE + row_id, lse)


@triton.jit
def _probs_and_dscores(
    q, do, k, v, lse, delta, key_ok, row_ok, qk_scale, PRECISION: tl.constexpr,
):
    """Recompute P [M, N] from lse and dS = P * (dO V^T - delta)."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(key_ok[None, :] & row_ok[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _dkdv_kernel(
    Q, DO, K, V, MASK, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_ab, stride_am, stride_ah,
    num_heads, q_len, k_len, head_dim, softmax_scale,
    HAS_MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile of one source, looping over every query tile; dQ by atomics if asked."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    in_range = offs_n < k_len
    k, v, key_ok = _load_key_tile(K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                  stride_vh, stride_mb, offs_n, in_range, offs_d, head_dim, HAS_MASK)
    qk_scale = softmax_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, q_len, BLOCK_M):
        offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        q, do, lse, delta, row_ok = _load_query_tile(
            Q, DO, LSE, DELTA, b, h, pid_bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
            offs_m, q_len, offs_d, head_dim,
        )
        p, ds = _probs_and_dscores(q, do, k, v, lse, delta, key_ok, row_ok, qk_scale, PRECISION)
        dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * softmax_scale
            a_ptrs = DQ_ACC + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :]
            tl.atomic_add(a_ptrs, dq, mask=row_ok[:, None] & d_ok)
    dk_ptrs = DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :]
    dv_ptrs = DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :]
    store_mask = in_range[:, None] & d_ok
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dq_kernel(
    Q, DO, K, V, MASK, LSE, DELTA, DQ_ACC,
    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    stride_ab, stride_am, stride_ah,
    num_heads, q_len, k_len, head_dim, softmax_scale,
    HAS_MASK: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic dQ of one query tile: adds this source's contribution to the float32 accumulator."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    q, do, lse, delta, row_ok = _load_query_tile(
        Q, DO, LSE, DELTA, b, h, pid_bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
        offs_m, q_len, offs_d, head_dim,
    )
    io_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    qk_scale = softmax_scale * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        k, v, key_ok = _load_key_tile(K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                      stride_vh, stride_mb, offs_n, offs_n < k_len, offs_d, head_dim, HAS_MASK)
        p, ds = _probs_and_dscores(q, do, k, v, lse, delta, key_ok, row_ok, qk_scale, PRECISION)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    a_ptrs = DQ_ACC + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_am + offs_d[None, :]
    previous = tl.load(a_ptrs, mask=io_mask, other=0.0)
    tl.store(a_ptrs, previous + dq * softmax_scale, mask=io_mask)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_m(q_len: int) -> int:
    return min(64, max(16, triton.next_power_of_2(q_len)))


def _multiprocessor_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def choose_num_splits(programs: int, total_keys: int, block_n: int, device: torch.device) -> int:
    """Split the keys when B*H*query-tiles would leave streaming multiprocessors idle."""
    if forced_num_splits() is not None:
        return min(forced_num_splits(), max(1, triton.cdiv(total_keys, block_n)))
    sms = _multiprocessor_count(device)
    if programs >= sms:
        return 1
    wanted = triton.cdiv(2 * sms, programs)
    return max(1, min(wanted, triton.cdiv(total_keys, 2 * block_n), MAX_SPLITS))


def _source_args(ks, vs, masks) -> Tuple[list, list, list, list]:
    pointers, strides, has_mask, lengths = [], [], [], []
    for i in range(MAX_SOURCES):
        j = min(i, len(ks) - 1)
        k, v, mask = ks[j], vs[j], masks[j]
        pointers += [k, v, mask if mask is not None else k]
        strides += [k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                    mask.stride(0) if mask is not None else 0]
        has_mask.append(mask is not None and i < len(ks))
        lengths.append(k.shape[1] if i < len(ks) else 0)
    return pointers, strides, has_mask, lengths


def forward(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]], softmax_scale: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] and lse float32 [B, H, Lq] of q over the concatenated sources, no copies."""
    if len(ks) > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} key/value sources, got {len(ks)}")
    q = _last_dim_contiguous(q)
    ks = [_last_dim_contiguous(k) for k in ks]
    vs = [_last_dim_contiguous(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    batch, q_len, heads, head_dim = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _block_m(q_len), 64, _block_d(head_dim)
    m_tiles = triton.cdiv(q_len, block_m)
    total_keys = sum(k.shape[1] for k in ks)
    num_splits = choose_num_splits(batch * heads * m_tiles, total_keys, block_n, q.device)
    split_size = triton.cdiv(triton.cdiv(total_keys, num_splits), block_n) * block_n
    num_splits = triton.cdiv(total_keys, split_size)
    split = num_splits > 1
    part_out = torch.empty((num_splits, batch * heads, q_len, block_d), dtype=torch.float32, device=q.device) if split else lse
    part_lse = torch.empty((num_splits, batch * heads, q_len), dtype=torch.float32, device=q.device) if split else lse
    pointers, strides, has_mask, lengths = _source_args(ks, vs, masks)
    grid = (m_tiles, batch * heads, num_splits)
    kernel, tuning = _forward_launcher()
    kernel[grid](
        q, out, lse, part_out, part_lse, *pointers,
        q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *strides, *lengths,
        heads, q_len, head_dim, split_size, softmax_scale * LOG2E,
        NUM_SOURCES=len(ks), HAS_M0=has_mask[0], HAS_M1=has_mask[1], HAS_M2=has_mask[2], HAS_M3=has_mask[3],
        SPLIT=split, PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_D=block_d, **tuning,
    )
    if split:
        _combine_kernel[(batch * heads * q_len,)](
            part_out, part_lse, out, lse, out.stride(0), out.stride(1), out.stride(2),
            heads, q_len, head_dim, batch * heads, num_splits,
            SPLITS_POW2=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d,
        )
    return out, lse


def backward(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor,
    lse: torch.Tensor, softmax_scale: float, deterministic: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(dq, dks, dvs); deterministic=True computes dQ without atomics."""
    q, dout = _last_dim_contiguous(q), _last_dim_contiguous(dout)
    ks = [_last_dim_contiguous(k) for k in ks]
    vs = [_last_dim_contiguous(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    batch, q_len, heads, head_dim = q.shape
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    if dlse is not None:
        delta = delta - dlse.float()
    lse = lse.contiguous()
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    block_m, block_n, block_d = _block_m(q_len), 64, _block_d(head_dim)
    precision = _precision(q.dtype)
    common = (q.stride(0), q.stride(1), q.stride(2), dout.stride(0), dout.stride(1), dout.stride(2))
    acc_strides = (dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2))
    dks, dvs = [], []
    for k, v, mask in zip(ks, vs, masks):
        dk, dv = k.new_empty(k.shape), v.new_empty(v.shape)
        source = (k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
                  mask.stride(0) if mask is not None else 0)
        mask_arg = mask if mask is not None else k
        _dkdv_kernel[(triton.cdiv(k.shape[1], block_n), batch * heads)](
            q, dout, k, v, mask_arg, lse, delta, dk, dv, dq_acc, *common, *source,
            dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *acc_strides,
            heads, q_len, k.shape[1], head_dim, softmax_scale,
            HAS_MASK=mask is not None, ATOMIC_DQ=not deterministic, PRECISION=precision,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        )
        if deterministic:
            _dq_kernel[(triton.cdiv(q_len, block_m), batch * heads)](
                q, dout, k, v, mask_arg, lse, delta, dq_acc, *common, *source, *acc_strides,
                heads, q_len, k.shape[1], head_dim, softmax_scale,
                HAS_MASK=mask is not None, PRECISION=precision,
                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            )
        dks.append(dk)
        dvs.append(dv)
    return dq_acc.to(q.dtype), dks, dvs
