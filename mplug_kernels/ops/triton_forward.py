"""Forward Triton kernels for short queries attending to up to four long key/value sources.

One program per (query tile of 32 or 64 rows, batch*head, split); the query tiles of one head are neighbours
in the grid. A program walks the key sources in turn with one running softmax over its slice of the virtual
concatenation of all sources; with several splits (split-KV) the partial outputs and their log-sum-exp are
merged by the combine kernel. Launched by mplug_kernels.ops.triton_launch; tile helpers in triton_tiles.
"""
import triton
import triton.language as tl

from mplug_kernels.ops.triton_tiles import (
    _key_positions, _load_key_tile, _load_rows, _query_positions, _tile_ptrs, _tile_seen, _visible,
)


@triton.jit
def _attend_source(
    acc, m_i, l_i, q, K, V, MASK, POS, qpos, qpos_max,
    stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb, stride_pb,
    lo, hi, b, h, offs_d, head_dim, qk_scale,
    HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fold keys [lo, hi) of K/V head h of one source into the running (acc, m_i, l_i); scores in log2 units.
    With key positions, a tile that no query of the block (positions qpos, max qpos_max) sees is not loaded."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = (start + tl.arange(0, BLOCK_N)).to(tl.int64)
        if HAS_POS:
            kpos = _key_positions(POS, b, stride_pb, offs_n, offs_n < hi)
            if _tile_seen(kpos, qpos_max):
                acc, m_i, l_i = _fold_key_tile(
                    acc, m_i, l_i, q, K, V, MASK, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                    stride_mb, offs_n, hi, kpos, qpos, b, h, offs_d, head_dim, qk_scale, HAS_MASK, True, PRECISION)
        else:
            acc, m_i, l_i = _fold_key_tile(
                acc, m_i, l_i, q, K, V, MASK, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh,
                stride_mb, offs_n, hi, None, None, b, h, offs_d, head_dim, qk_scale, HAS_MASK, False, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _fold_key_tile(
    acc, m_i, l_i, q, K, V, MASK, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn, stride_vh, stride_mb,
    offs_n, hi, kpos, qpos, b, h, offs_d, head_dim, qk_scale,
    HAS_MASK: tl.constexpr, HAS_POS: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key tile offs_n (< hi) folded into the running softmax (acc [M, D], m_i, l_i [M])."""
    k, v, key_ok = _load_key_tile(K, V, MASK, b, h, stride_kb, stride_kn, stride_kh, stride_vb, stride_vn,
                                  stride_vh, stride_mb, offs_n, offs_n < hi, offs_d, head_dim, HAS_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(_visible(key_ok, kpos, qpos, HAS_POS), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _source_range(split_lo, split_hi, offset, length):
    lo = tl.minimum(tl.maximum(split_lo - offset, 0), length)
    hi = tl.minimum(tl.maximum(split_hi - offset, 0), length)
    return lo, hi


@triton.jit(do_not_specialize=["num_splits", "keys_bucket"])
def _forward_kernel(
    Q, OUT, LSE, PART_OUT, PART_LSE,
    K0, V0, M0, K1, V1, M1, K2, V2, M2, K3, V3, M3, P0, P1, P2, P3, QPOS,
    stride_qb, stride_qm, stride_qh,
    stride_ob, stride_om, stride_oh,
    ks0b, ks0n, ks0h, vs0b, vs0n, vs0h, ms0,
    ks1b, ks1n, ks1h, vs1b, vs1n, vs1h, ms1,
    ks2b, ks2n, ks2h, vs2b, vs2n, vs2h, ms2,
    ks3b, ks3n, ks3h, vs3b, vs3n, vs3h, ms3,
    L0, L1, L2, L3, ps0, ps1, ps2, ps3, stride_qpb,
    num_heads, kv_group, q_len, head_dim, split_size, num_splits, qk_scale, keys_bucket,
    NUM_SOURCES: tl.constexpr, HAS_M0: tl.constexpr, HAS_M1: tl.constexpr, HAS_M2: tl.constexpr,
    HAS_M3: tl.constexpr, HAS_P0: tl.constexpr, HAS_P1: tl.constexpr, HAS_P2: tl.constexpr,
    HAS_P3: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # _program_tile's prologue, inline: through the helper ptxas gives the BLOCK_M = 64, D = 128 candidate
    # 6 more registers on sm_90 (193 instead of 187; python -m bench.static)
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    pid_split = tl.program_id(2)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    hk = h // kv_group  # the K/V head of query head h: grouped heads read K/V in place
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < q_len
    q = _load_rows(Q, b, h, stride_qb, stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)
    qpos, qpos_max = None, None  # query positions [BLOCK_M] and their max, read when a source has key positions
    if HAS_P0 or HAS_P1 or HAS_P2 or HAS_P3:
        qpos = _query_positions(QPOS, b, stride_qpb, offs_m, row_ok)
        qpos_max = tl.max(qpos, 0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    split_lo = pid_split * split_size
    # the last split holds every key left (split_keys merges a sliver shorter than a key tile into it)
    split_hi = tl.where(pid_split == num_splits - 1, L0 + L1 + L2 + L3, split_lo + split_size)
    lo, hi = _source_range(split_lo, split_hi, 0, L0)
    acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K0, V0, M0, P0, qpos, qpos_max,
                                   ks0b, ks0n, ks0h, vs0b, vs0n, vs0h, ms0, ps0,
                                   lo, hi, b, hk, offs_d, head_dim, qk_scale, HAS_M0, HAS_P0, BLOCK_N, PRECISION)
    if NUM_SOURCES > 1:
        lo, hi = _source_range(split_lo, split_hi, L0, L1)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K1, V1, M1, P1, qpos, qpos_max,
                                       ks1b, ks1n, ks1h, vs1b, vs1n, vs1h, ms1, ps1,
                                       lo, hi, b, hk, offs_d, head_dim, qk_scale, HAS_M1, HAS_P1, BLOCK_N, PRECISION)
    if NUM_SOURCES > 2:
        lo, hi = _source_range(split_lo, split_hi, L0 + L1, L2)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K2, V2, M2, P2, qpos, qpos_max,
                                       ks2b, ks2n, ks2h, vs2b, vs2n, vs2h, ms2, ps2,
                                       lo, hi, b, hk, offs_d, head_dim, qk_scale, HAS_M2, HAS_P2, BLOCK_N, PRECISION)
    if NUM_SOURCES > 3:
        lo, hi = _source_range(split_lo, split_hi, L0 + L1 + L2, L3)
        acc, m_i, l_i = _attend_source(acc, m_i, l_i, q, K3, V3, M3, P3, qpos, qpos_max,
                                       ks3b, ks3n, ks3h, vs3b, vs3n, vs3h, ms3, ps3,
                                       lo, hi, b, hk, offs_d, head_dim, qk_scale, HAS_M3, HAS_P3, BLOCK_N, PRECISION)

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
