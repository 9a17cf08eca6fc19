"""Triton kernels for short queries attending to up to four long key/value sources.

Forward: one program per (query tile of 32 or 64 rows, batch*head, split); the query tiles of one head are
neighbours in the grid. A program walks the key sources in turn with one running softmax over its slice of the
virtual concatenation of all sources; with several splits (split-KV, count from the kernel's occupancy:
mplug_kernels.occupancy) the partial outputs and their log-sum-exp are merged by a combine kernel. Backward:
delta = rowsum(dO * O) by a small kernel, then a dK/dV kernel per source (dQ by atomics, or a separate
deterministic dQ kernel). Block sizes are chosen per head dim and dtype so that no launch spills or exceeds
shared memory on sm_80 or sm_90; forward autotuning candidates that would are pruned before tuning
(bench/static_triton.py compiles every launch ahead of time to check). Masked keys and values are selected
away, never multiplied by zero. Layout [B, S, H, D] with any strides (last dim contiguous); offsets 64-bit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from mplug_kernels.backends.triton import interpreter_on
from mplug_kernels.backends.kernel_inputs import forced_num_splits, mask_bytes
from mplug_kernels.occupancy import SMLimits, ctas_per_sm, device_limits, fits_without_spills, num_splits_for_occupancy

LOG2E = 1.4426950408889634
MAX_SOURCES = 4


@triton.jit
def _program_tile(num_heads, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """(bh, b, h, rows [BLOCK_ROWS], offs_d [BLOCK_D]) of this program: grid axis 1 is batch*head, axis 0 the
    tile of BLOCK_ROWS query or key rows; 64-bit indices."""
    bh = tl.program_id(1).to(tl.int64)
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    return bh, bh // num_heads, bh % num_heads, rows, tl.arange(0, BLOCK_D)


@triton.jit
def _tile_ptrs(base, b, h, stride_b, stride_h, offs_rows, stride_rows, offs_d):
    """Pointers [rows, BLOCK_D] to rows offs_rows of the (b, h) slice of a [B, S, H, D] tensor."""
    return base + b * stride_b + h * stride_h + offs_rows[:, None] * stride_rows + offs_d[None, :]


@triton.jit
def _load_rows(base, b, h, stride_b, stride_h, offs_rows, stride_rows, offs_d, rows_ok, head_dim):
    """A [rows, BLOCK_D] tile of the (b, h) slice; zero outside the valid rows and the head dim."""
    return tl.load(_tile_ptrs(base, b, h, stride_b, stride_h, offs_rows, stride_rows, offs_d),
                   mask=rows_ok[:, None] & (offs_d[None, :] < head_dim), other=0.0)


@triton.jit
def _load_key_tile(
    K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    offs_n, in_range, offs_d, head_dim, HAS_MASK: tl.constexpr,
):
    """k, v tiles [BLOCK_N, BLOCK_D] and which of their keys may be attended (in range and not padding);
    masked rows are selected to zero, so a NaN or inf there cannot reach a product (0 * NaN is NaN)."""
    k = _load_rows(K, b, h, stride_kb, stride_kh, offs_n, stride_kn, offs_d, in_range, head_dim)
    v = _load_rows(V, b, h, stride_vb, stride_vh, offs_n, stride_vn, offs_d, in_range, head_dim)
    key_ok = in_range
    if HAS_MASK:
        keep = tl.load(MASK + b * stride_mb + offs_n, mask=in_range, other=0)
        key_ok = key_ok & (keep != 0)
        k = tl.where(key_ok[:, None], k, 0.0)
        v = tl.where(key_ok[:, None], v, 0.0)
    return k, v, key_ok


@triton.jit
def _load_query_tile(
    Q, DO, LSE, DELTA, b, h, bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    offs_m, q_len, offs_d, head_dim,
):
    """q, dO tiles [BLOCK_M, BLOCK_D], their lse and delta rows, and which rows exist (backward)."""
    row_ok = offs_m < q_len
    q = _load_rows(Q, b, h, stride_qb, stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)
    do = _load_rows(DO, b, h, stride_dob, stride_doh, offs_m, stride_dom, offs_d, row_ok, head_dim)
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


@triton.jit(do_not_specialize=["num_splits", "keys_bucket"])
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
    num_heads, q_len, head_dim, split_size, num_splits, qk_scale, keys_bucket,
    NUM_SOURCES: tl.constexpr, HAS_M0: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
    HAS_M3: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # _program_tile's prologue, inline: through the helper ptxas gives the BLOCK_M = 64, D = 128 candidate
    # 6 more registers on sm_90 (193 instead of 187; python -m bench.static)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_split = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = _load_rows(Q, b, h, stride_qb, stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)

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
    if num_splits > 1:
        row = (pid_split * tl.num_programs(1) + pid_bh) * q_len + offs_m
        tl.store(PART_OUT + row[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
        tl.store(PART_LSE + row, lse, mask=row_ok)
    else:
        o_ptrs = _tile_ptrs(OUT, b, h, stride_ob, stride_oh, offs_m, stride_om, offs_d)
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok)
        tl.store(LSE + pid_bh * q_len + offs_m, lse, mask=row_ok)


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
def _delta_kernel(
    OUT, DO, DLSE, DELTA,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh, stride_lb, stride_lh, stride_lm,
    num_heads, q_len, head_dim,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """delta [B*H, Lq] = rowsum(dO * O) in float32, minus the lse gradient when there is one."""
    pid_bh, b, h, offs_m, offs_d = _program_tile(num_heads, BLOCK_M, BLOCK_D)
    row_ok = offs_m < q_len
    o = _load_rows(OUT, b, h, stride_ob, stride_oh, offs_m, stride_om, offs_d, row_ok, head_dim)
    do = _load_rows(DO, b, h, stride_dob, stride_doh, offs_m, stride_dom, offs_d, row_ok, head_dim)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=row_ok, other=0.0)
    tl.store(DELTA + pid_bh * q_len + offs_m, delta, mask=row_ok)


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
    pid_bh, b, h, offs_n, offs_d = _program_tile(num_heads, BLOCK_N, BLOCK_D)
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
            a_ptrs = _tile_ptrs(DQ_ACC, b, h, stride_ab, stride_ah, offs_m, stride_am, offs_d)
            tl.atomic_add(a_ptrs, dq, mask=row_ok[:, None] & d_ok)
    dk_ptrs = _tile_ptrs(DK, b, h, stride_dkb, stride_dkh, offs_n, stride_dkn, offs_d)
    dv_ptrs = _tile_ptrs(DV, b, h, stride_dvb, stride_dvh, offs_n, stride_dvn, offs_d)
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
    pid_bh, b, h, offs_m, offs_d = _program_tile(num_heads, BLOCK_M, BLOCK_D)
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
    a_ptrs = _tile_ptrs(DQ_ACC, b, h, stride_ab, stride_ah, offs_m, stride_am, offs_d)
    previous = tl.load(a_ptrs, mask=io_mask, other=0.0)
    tl.store(a_ptrs, previous + dq * softmax_scale, mask=io_mask)


# ---------------------------------------------------------------- configurations

def _config(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Forward autotuning candidates (BLOCK_N, num_warps, num_stages) per element size (2: fp16/bf16, 4: fp32); the
# first that fits is the configuration run untuned (_untuned_config). Before tuning, each candidate is compiled
# for the device and dropped when it spills or does not fit (_prune_forward); bench/static_triton.py compiles
# all of them for sm_80 and sm_90 at every head dim and BLOCK_M. fp32 dots are exact (ieee: FMA, not tensor
# cores), which holds whole operand rows per thread, so fp32 tiles are small and single-stage.
FORWARD_CANDIDATES = {
    2: ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2)),
    4: ((16, 8, 1), (16, 4, 1), (32, 8, 1)),
}
FORWARD_CONFIGS = [_config(*candidate) for candidate in dict.fromkeys(sum(FORWARD_CANDIDATES.values(), ()))]
# MPLUG_KERNELS_TRITON_AUTOTUNE=0 runs the forward with _untuned_config instead of tuning (GPU test runs,
# where tuning every new shape would cost more than the tests; every configuration has its own test).
AUTOTUNE_ENV = "MPLUG_KERNELS_TRITON_AUTOTUNE"

# Backward blocks per (element size, BLOCK_D): (largest BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV
# and dQ kernels, chosen so that neither spills nor exceeds sm_80's shared memory (bench/static_triton.py).
BACKWARD_BLOCKS = {
    (2, 16): (64, 32, 4, 2), (2, 32): (64, 32, 4, 2), (2, 64): (64, 32, 8, 2), (2, 128): (32, 32, 8, 2),
    (4, 16): (32, 32, 8, 1), (4, 32): (32, 32, 8, 1), (4, 64): (16, 16, 4, 1), (4, 128): (16, 16, 8, 1),
}
DELTA_META = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}
COMBINE_META = {"num_warps": 4, "num_stages": 1}

# Split-KV: a split holds a multiple of SPLIT_KEYS keys. Under the CPU interpreter no compiled kernel exists to
# read the occupancy from, so the rule sees INTERPRETER_SM_COUNT SMs of INTERPRETER_CTAS_PER_SM CTAs each.
SPLIT_KEYS = 32
INTERPRETER_CTAS_PER_SM = 2
INTERPRETER_SM_COUNT = 4


def config_meta(config: triton.Config) -> dict:
    """The launch keyword arguments of one forward configuration."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _candidate(config: triton.Config) -> Tuple[int, int, int]:
    return config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def forward_candidates(element_bytes: int) -> List[triton.Config]:
    """The forward's autotuning candidates for elements of this many bytes (2 or 4)."""
    return [config for config in FORWARD_CONFIGS if _candidate(config) in FORWARD_CANDIDATES[element_bytes]]


def backward_meta(element_bytes: int, head_dim: int, q_len: int) -> dict:
    """BLOCK_M/N/D, num_warps and num_stages of the dK/dV and dQ kernels for this element size and shape."""
    block_d = _block_d(head_dim)
    max_block_m, block_n, warps, stages = BACKWARD_BLOCKS[(element_bytes, block_d)]
    return {"BLOCK_M": min(max_block_m, _block_m(q_len, element_bytes)), "BLOCK_N": block_n,
            "BLOCK_D": block_d, "num_warps": warps, "num_stages": stages}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_m(q_len: int, element_bytes: int) -> int:
    """Query rows per program: 32 up to Lq = 32 (mPLUG's text, at most 2x padding at Lq = 25), else 64;
    always 32 in fp32, whose exact (FMA) dots spill at 64 rows of D = 128 on sm_90."""
    return 32 if q_len <= 32 or element_bytes == 4 else 64


def prune_configs(configs: Sequence[triton.Config], facts_of: Callable[[triton.Config], KernelFacts],
                  limits: SMLimits) -> List[triton.Config]:
    """The configs whose compiled kernel (facts_of) spills nothing and fits one SM of `limits`."""
    kept = [config for config in configs if facts_of(config).fits(limits)]
    if not kept:
        raise RuntimeError(f"every Triton configuration spills or exceeds shared memory here: {configs}")
    return kept


@dataclass(frozen=True)
class KernelFacts:
    """Resources of one compiled kernel: registers and spilled bytes per thread, shared bytes per CTA, threads."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    threads: int

    def fits(self, limits: Union[int, SMLimits]) -> bool:
        """No spills, and one CTA fits an SM of sm_<limits> (or of SMLimits)."""
        return fits_without_spills(self.registers, self.spill_bytes, self.shared_bytes, self.threads, limits)

    def ctas_per_sm(self, limits: Union[int, SMLimits]) -> int:
        return ctas_per_sm(self.registers, self.shared_bytes, self.threads, limits)


def compiled_facts(kernel, args: Sequence, meta: dict) -> KernelFacts:
    """KernelFacts of `kernel` compiled by the JIT for the current CUDA device with these arguments (GPU only;
    Triton reports local memory in 4-byte words as n_spills)."""
    compiled = kernel.warmup(*args, grid=(1,), **meta)
    compiled._init_handles()
    return KernelFacts(compiled.n_regs, 4 * compiled.n_spills, compiled.metadata.shared,
                       compiled.metadata.num_warps * 32)


def _prune_forward(configs, named_args, **kwargs):
    """early_config_prune of the tuned forward: this element size's candidates that fit the device."""
    q = named_args["Q"]
    args = list(named_args.values())
    wanted = FORWARD_CANDIDATES[q.element_size()]
    candidates = [config for config in configs if _candidate(config) in wanted]
    facts_of = lambda config: compiled_facts(_forward_kernel, args, {**kwargs, **config_meta(config)})
    return prune_configs(candidates, facts_of, device_limits(q.device))


_tuned_forward_kernel = triton.autotune(
    configs=FORWARD_CONFIGS,
    key=["NUM_SOURCES", "BLOCK_M", "BLOCK_D", "keys_bucket"],
    prune_configs_by={"early_config_prune": _prune_forward},
)(_forward_kernel)


def _forward_launcher():
    """(kernel, meta): the autotuned kernel and {} on a GPU; the plain kernel and None (_untuned_config)
    under the CPU interpreter (tuning there is meaningless) or with MPLUG_KERNELS_TRITON_AUTOTUNE=0."""
    if interpreter_on() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return _forward_kernel, None
    return _tuned_forward_kernel, {}


# ---------------------------------------------------------------- launches

@dataclass
class Launch:
    """One kernel launch: the @triton.jit kernel, grid, positional arguments and keyword (constexpr, warps,
    stages) arguments; `tuned` launches take their BLOCK_N/warps/stages from the autotuner or _untuned_config."""

    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    meta: dict
    tuned: bool = False

    def run(self) -> None:
        if not self.tuned:
            self.kernel[self.grid](*self.args, **self.meta)
            return
        kernel, tuning = _forward_launcher()
        tuning = config_meta(_untuned_config(self)) if tuning is None else tuning
        kernel[self.grid](*self.args, **self.meta, **tuning)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _source_args(ks, vs, masks) -> Tuple[list, list, list, list]:
    pointers, strides, has_mask, lengths = [], [], [], []
    for i in range(MAX_SOURCES):
        j = min(i, len(ks) - 1)
        k, v, mask = ks[j], vs[j], masks[j]
        pointers += [k, v, mask if mask is not None else k]
        strides += [*_strides3(k), *_strides3(v), mask.stride(0) if mask is not None else 0]
        has_mask.append(mask is not None and i < len(ks))
        lengths.append(k.shape[1] if i < len(ks) else 0)
    return pointers, strides, has_mask, lengths


def forward_launches(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
    softmax_scale: float, out: torch.Tensor, lse: torch.Tensor, num_splits: int,
) -> List[Launch]:
    """The forward kernel (tuned) and, with several splits, the combine kernel writing out/lse; q, ks, vs with
    a contiguous last dim, masks as mask_bytes. Partial-output buffers are allocated here."""
    batch, q_len, heads, head_dim = q.shape
    block_m, block_d = _block_m(q_len, q.element_size()), _block_d(head_dim)
    total_keys = sum(k.shape[1] for k in ks)
    split_size = triton.cdiv(triton.cdiv(total_keys, num_splits), SPLIT_KEYS) * SPLIT_KEYS
    num_splits = triton.cdiv(total_keys, split_size)
    split = num_splits > 1
    f32 = dict(dtype=torch.float32, device=q.device)
    part_out = torch.empty((num_splits, batch * heads, q_len, block_d), **f32) if split else lse
    part_lse = torch.empty((num_splits, batch * heads, q_len), **f32) if split else lse
    pointers, strides, has_mask, lengths = _source_args(ks, vs, masks)
    forward = Launch(
        _forward_kernel, (triton.cdiv(q_len, block_m), batch * heads, num_splits),
        (q, out, lse, part_out, part_lse, *pointers, *_strides3(q), *_strides3(out), *strides, *lengths,
         heads, q_len, head_dim, split_size, num_splits, softmax_scale * LOG2E,
         triton.next_power_of_2(triton.cdiv(split_size, 64))),
        dict(NUM_SOURCES=len(ks), HAS_M0=has_mask[0], HAS_M1=has_mask[1], HAS_M2=has_mask[2], HAS_M3=has_mask[3],
             PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_D=block_d),
        tuned=True,
    )
    if not split:
        return [forward]
    combine = Launch(
        _combine_kernel, (batch * heads * q_len,),
        (part_out, part_lse, out, lse, *_strides3(out), heads, q_len, head_dim, batch * heads, num_splits),
        dict(SPLITS_POW2=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, **COMBINE_META),
    )
    return [forward, combine]


def _untuned_config(launch: Launch) -> triton.Config:
    """The forward configuration run without tuning: the first candidate that fits the GPU (the first one
    under the CPU interpreter, where nothing is compiled)."""
    q = launch.args[0]
    candidates = forward_candidates(q.element_size())
    if q.device.type != "cuda":
        return candidates[0]
    return _prune_forward(candidates, dict(zip(_forward_kernel.arg_names, launch.args)), **launch.meta)[0]


def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_forward_occupancy: Dict[tuple, int] = {}


def _forward_ctas_per_sm(launch: Launch) -> int:
    """CTAs per SM of the unsplit forward in its untuned configuration, compiled for the current GPU."""
    q = launch.args[0]
    key = (q.device, q.dtype, tuple(sorted(launch.meta.items())))
    if key not in _forward_occupancy:
        meta = {**launch.meta, **config_meta(_untuned_config(launch))}
        facts = compiled_facts(launch.kernel, launch.args, meta)
        _forward_occupancy[key] = max(1, facts.ctas_per_sm(device_limits(q.device)))
    return _forward_occupancy[key]


def choose_num_splits(unsplit: Launch, total_keys: int) -> int:
    """Split-KV count of a forward launch: forced, or num_splits_for_occupancy with the kernel's CTAs per SM
    compiled for the GPU (fixed INTERPRETER_* values on the CPU)."""
    key_tiles = triton.cdiv(total_keys, SPLIT_KEYS)
    if forced_num_splits() is not None:
        return min(forced_num_splits(), max(1, key_tiles))
    q = unsplit.args[0]
    ctas = unsplit.grid[0] * unsplit.grid[1]
    if q.device.type != "cuda":
        return num_splits_for_occupancy(ctas, INTERPRETER_CTAS_PER_SM, INTERPRETER_SM_COUNT, key_tiles)
    return num_splits_for_occupancy(ctas, _forward_ctas_per_sm(unsplit), _multiprocessor_count(q.device), key_tiles)


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
    batch, q_len, heads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    total_keys = sum(k.shape[1] for k in ks)
    num_splits = choose_num_splits(forward_launches(q, ks, vs, masks, softmax_scale, out, lse, 1)[0], total_keys)
    for launch in forward_launches(q, ks, vs, masks, softmax_scale, out, lse, num_splits):
        launch.run()
    return out, lse


def backward_launches(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, deterministic: bool, dq_acc: torch.Tensor, dks: Sequence[torch.Tensor],
    dvs: Sequence[torch.Tensor],
) -> List[Launch]:
    """delta, then per source dK/dV (dQ by atomics into dq_acc) or dK/dV and the deterministic dQ kernel;
    inputs with a contiguous last dim, masks as mask_bytes, lse contiguous; allocates delta."""
    batch, q_len, heads, head_dim = q.shape
    delta = torch.empty((batch * heads, q_len), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    lse_strides = (dlse.stride(0), dlse.stride(1), dlse.stride(2)) if dlse is not None else (0, 0, 0)
    launches = [Launch(
        _delta_kernel, (triton.cdiv(q_len, DELTA_META["BLOCK_M"]), batch * heads),
        (out, dout, dlse if dlse is not None else delta, delta, *_strides3(out), *_strides3(dout), *lse_strides,
         heads, q_len, head_dim),
        dict(HAS_DLSE=dlse is not None, BLOCK_D=block_d, **DELTA_META),
    )]
    meta = dict(PRECISION=_precision(q.dtype), **backward_meta(q.element_size(), head_dim, q_len))
    common = (*_strides3(q), *_strides3(dout))
    for k, v, mask, dk, dv in zip(ks, vs, masks, dks, dvs):
        source = (*_strides3(k), *_strides3(v), mask.stride(0) if mask is not None else 0)
        mask_arg = mask if mask is not None else k
        shape = (heads, q_len, k.shape[1], head_dim, softmax_scale)
        launches.append(Launch(
            _dkdv_kernel, (triton.cdiv(k.shape[1], meta["BLOCK_N"]), batch * heads),
            (q, dout, k, v, mask_arg, lse, delta, dk, dv, dq_acc, *common, *source, *_strides3(dk), *_strides3(dv),
             *_strides3(dq_acc), *shape),
            dict(HAS_MASK=mask is not None, ATOMIC_DQ=not deterministic, **meta),
        ))
        if deterministic:
            launches.append(Launch(
                _dq_kernel, (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads),
                (q, dout, k, v, mask_arg, lse, delta, dq_acc, *common, *source, *_strides3(dq_acc), *shape),
                dict(HAS_MASK=mask is not None, **meta),
            ))
    return launches


def backward(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor,
    lse: torch.Tensor, softmax_scale: float, deterministic: bool,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(dq, dks, dvs); deterministic=True computes dQ without atomics."""
    q, dout, out = _last_dim_contiguous(q), _last_dim_contiguous(dout), _last_dim_contiguous(out)
    ks = [_last_dim_contiguous(k) for k in ks]
    vs = [_last_dim_contiguous(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return q.new_zeros(q.shape), [k.new_zeros(k.shape) for k in ks], [v.new_zeros(v.shape) for v in vs]
    dks = [k.new_empty(k.shape) for k in ks]
    dvs = [v.new_empty(v.shape) for v in vs]
    for launch in backward_launches(dout, dlse, q, ks, vs, masks, out, lse.contiguous(), softmax_scale,
                                    deterministic, dq_acc, dks, dvs):
        launch.run()
    return dq_acc.to(q.dtype), dks, dvs
