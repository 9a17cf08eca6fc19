"""Backward Triton kernels: delta = rowsum(dO * O) by a small kernel, then a dK/dV kernel per source
(dQ by atomics, or a separate deterministic dQ kernel). Launched by mplug_kernels.ops.triton_launch; tile
helpers in triton_tiles.
"""
import triton
import triton.language as tl

from mplug_kernels.ops.triton_tiles import (
    _key_positions, _load_key_tile, _load_query_tile, _load_rows, _program_tile, _query_positions, _tile_ptrs,
    _tile_seen, _visible,
)


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
    q, do, k, v, lse, delta, key_ok, row_ok, kpos, qpos, qk_scale, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute P [M, N] from lse and dS = P * (dO V^T - delta); P = 0 where a key is not visible."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    p = tl.exp2(s - lse2[:, None])
    p = tl.where(_visible(key_ok, kpos, qpos, HAS_POS) & row_ok[:, None], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _row_max_position(QPOS, b, stride_qpb, q_len, BLOCK_M: tl.constexpr):
    """The largest query position of batch row b (int32 [B, Lq])."""
    top = tl.full([BLOCK_M], -2147483647, dtype=tl.int32)
    for start_m in range(0, q_len, BLOCK_M):
        offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
        top = tl.maximum(top, _query_positions(QPOS, b, stride_qpb, offs_m, offs_m < q_len))
    return tl.max(top, 0)


@triton.jit
def _dkdv_kernel(
    Q, DO, K, V, MASK, POS, QPOS, LSE, DELTA, DK, DV, DQ_ACC,
    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, stride_pb, stride_qpb,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_ab, stride_am, stride_ah,
    num_heads, kv_group, q_len, k_len, head_dim, softmax_scale,
    HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, ZERO_DEAD: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dK, dV of one key tile of K/V head hk of one source (grid axis 1: batch * K/V heads), summed over every
    query tile of the kv_group query heads hk * kv_group.. that read it (no atomics); dQ by atomics if asked.
    With key positions, K/V are not loaded when no query of the batch row sees the tile, nor a query tile
    read when none of its queries does; ZERO_DEAD zeroes the q rows that see no key."""
    _, b, hk, offs_n, offs_d = _program_tile(num_heads // kv_group, BLOCK_N, BLOCK_D)
    d_ok = offs_d[None, :] < head_dim
    in_range = offs_n < k_len
    kpos, load_ok = None, in_range
    if HAS_POS:
        kpos = _key_positions(POS, b, stride_pb, offs_n, in_range)
        load_ok = tl.where(_tile_seen(kpos, _row_max_position(QPOS, b, stride_qpb, q_len, BLOCK_M)), in_range, False)
    k, v, key_ok = _load_key_tile(K, V, MASK, b, hk, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                  stride_vh, stride_mb, offs_n, load_ok, offs_d, head_dim, HAS_MASK)
    qk_scale = softmax_scale * 1.4426950408889634
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(0, kv_group):
        h = hk * kv_group + g
        pid_bh = b * num_heads + h
        for start_m in range(0, q_len, BLOCK_M):
            offs_m = (start_m + tl.arange(0, BLOCK_M)).to(tl.int64)
            if HAS_POS:
                qpos = _query_positions(QPOS, b, stride_qpb, offs_m, offs_m < q_len)
                if _tile_seen(kpos, tl.max(qpos, 0)):
                    dk, dv = _dkdv_step(
                        dk, dv, Q, DO, LSE, DELTA, DQ_ACC, k, v, key_ok, kpos, qpos, b, h, pid_bh,
                        stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh, stride_ab, stride_am,
                        stride_ah, offs_m, q_len, offs_d, d_ok, head_dim, qk_scale, softmax_scale,
                        True, ZERO_DEAD, ATOMIC_DQ, PRECISION)
            else:
                dk, dv = _dkdv_step(
                    dk, dv, Q, DO, LSE, DELTA, DQ_ACC, k, v, key_ok, None, None, b, h, pid_bh,
                    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh, stride_ab, stride_am,
                    stride_ah, offs_m, q_len, offs_d, d_ok, head_dim, qk_scale, softmax_scale,
                    False, ZERO_DEAD, ATOMIC_DQ, PRECISION)
    dk_ptrs = _tile_ptrs(DK, b, hk, stride_dkb, stride_dkh, offs_n, stride_dkn, offs_d)
    dv_ptrs = _tile_ptrs(DV, b, hk, stride_dvb, stride_dvh, offs_n, stride_dvn, offs_d)
    store_mask = in_range[:, None] & d_ok
    tl.store(dk_ptrs, (dk * softmax_scale).to(DK.dtype.element_ty), mask=store_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=store_mask)


@triton.jit
def _dkdv_step(
    dk, dv, Q, DO, LSE, DELTA, DQ_ACC, k, v, key_ok, kpos, qpos, b, h, pid_bh,
    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh, stride_ab, stride_am, stride_ah,
    offs_m, q_len, offs_d, d_ok, head_dim, qk_scale, softmax_scale,
    HAS_POS: tl.constexpr, ZERO_DEAD: tl.constexpr, ATOMIC_DQ: tl.constexpr, PRECISION: tl.constexpr,
):
    """dK, dV [BLOCK_N, BLOCK_D] plus the contribution of query rows offs_m of head h (and their dQ by atomics)."""
    q, do, lse, delta, row_ok = _load_query_tile(
        Q, DO, LSE, DELTA, b, h, pid_bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom,
        stride_doh, offs_m, q_len, offs_d, head_dim, ZERO_DEAD,
    )
    p, ds = _probs_and_dscores(q, do, k, v, lse, delta, key_ok, row_ok, kpos, qpos, qk_scale, HAS_POS, PRECISION)
    dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
    dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    if ATOMIC_DQ:
        dq = tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * softmax_scale
        a_ptrs = _tile_ptrs(DQ_ACC, b, h, stride_ab, stride_ah, offs_m, stride_am, offs_d)
        tl.atomic_add(a_ptrs, dq, mask=row_ok[:, None] & d_ok)
    return dk, dv


@triton.jit
def _dq_kernel(
    Q, DO, K, V, MASK, POS, QPOS, LSE, DELTA, DQ_ACC,
    stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, stride_pb, stride_qpb,
    stride_ab, stride_am, stride_ah,
    num_heads, kv_group, q_len, k_len, head_dim, softmax_scale,
    HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Deterministic dQ of one query tile of head h (K/V head h // kv_group): adds this source's contribution to
    the float32 accumulator; with key positions, key tiles that no query of the tile sees are not loaded."""
    pid_bh, b, h, offs_m, offs_d = _program_tile(num_heads, BLOCK_M, BLOCK_D)
    hk = h // kv_group
    q, do, lse, delta, row_ok = _load_query_tile(
        Q, DO, LSE, DELTA, b, h, pid_bh, stride_qb, stride_qm, stride_qh, stride_dob, stride_dom, stride_doh,
        offs_m, q_len, offs_d, head_dim, False,
    )
    io_mask = row_ok[:, None] & (offs_d[None, :] < head_dim)
    qk_scale = softmax_scale * 1.4426950408889634
    qpos, qpos_max = None, 0
    if HAS_POS:
        qpos = _query_positions(QPOS, b, stride_qpb, offs_m, row_ok)
        qpos_max = tl.max(qpos, 0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, k_len, BLOCK_N):
        offs_n = (start_n + tl.arange(0, BLOCK_N)).to(tl.int64)
        if HAS_POS:
            kpos = _key_positions(POS, b, stride_pb, offs_n, offs_n < k_len)
            if _tile_seen(kpos, qpos_max):
                dq = _dq_step(dq, q, do, lse, delta, row_ok, K, V, MASK, kpos, qpos, b, hk, stride_kb, stride_kn,
                              stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, offs_n, k_len, offs_d, head_dim,
                              qk_scale, HAS_MASK, True, PRECISION)
        else:
            dq = _dq_step(dq, q, do, lse, delta, row_ok, K, V, MASK, None, None, b, hk, stride_kb, stride_kn,
                          stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, offs_n, k_len, offs_d, head_dim,
                          qk_scale, HAS_MASK, False, PRECISION)
    a_ptrs = _tile_ptrs(DQ_ACC, b, h, stride_ab, stride_ah, offs_m, stride_am, offs_d)
    previous = tl.load(a_ptrs, mask=io_mask, other=0.0)
    tl.store(a_ptrs, previous + dq * softmax_scale, mask=io_mask)


@triton.jit
def _dq_step(
    dq, q, do, lse, delta, row_ok, K, V, MASK, kpos, qpos, b, hk,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, offs_n, k_len, offs_d, head_dim,
    qk_scale, HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):
    """dQ [BLOCK_M, BLOCK_D] (unscaled) plus the contribution of key tile offs_n of K/V head hk."""
    k, v, key_ok = _load_key_tile(K, V, MASK, b, hk, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                  stride_vh, stride_mb, offs_n, offs_n < k_len, offs_d, head_dim, HAS_MASK)
    p, ds = _probs_and_dscores(q, do, k, v, lse, delta, key_ok, row_ok, kpos, qpos, qk_scale, HAS_POS, PRECISION)
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
