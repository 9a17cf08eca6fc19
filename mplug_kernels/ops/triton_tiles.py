"""Addressing and loading helpers (@triton.jit) that the forward and backward Triton kernels share.

Layout [B, S, H, D] with any strides (last dim contiguous); offsets 64-bit. Masked keys and values are selected
away, never multiplied by zero. Positions (int32 [B, L], contiguous) decide visibility: key j is visible to query t
iff its position <= t's.
"""
import triton
import triton.language as tl


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
    offs_m, q_len, offs_d, head_dim, ZERO_DEAD: tl.constexpr,
):
    """q, dO tiles [BLOCK_M, BLOCK_D], their lse and delta rows, and which rows exist (backward); with ZERO_DEAD
    the q rows that saw no key (lse -inf) are selected to zero, so a NaN there cannot reach dK (0 * NaN is NaN)."""
    row_ok = offs_m < q_len
    q = _load_rows(Q, b, h, stride_qb, stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)
    do = _load_rows(DO, b, h, stride_dob, stride_doh, offs_m, stride_dom, offs_d, row_ok, head_dim)
    lse = tl.load(LSE + bh * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * q_len + offs_m, mask=row_ok, other=0.0)
    if ZERO_DEAD:
        q = tl.where((lse == float("-inf"))[:, None], 0.0, q)
    return q, do, lse, delta, row_ok


@triton.jit
def _key_positions(POS, b, stride_pb, offs_n, in_range):
    """int32 positions [BLOCK_N] of keys offs_n of batch row b; the largest int32 outside the range."""
    return tl.load(POS + b * stride_pb + offs_n, mask=in_range, other=2147483647)


@triton.jit
def _query_positions(QPOS, b, stride_qpb, offs_m, row_ok):
    """int32 positions [BLOCK_M] of queries offs_m of batch row b; the smallest int32 (but one) outside Lq."""
    return tl.load(QPOS + b * stride_qpb + offs_m, mask=row_ok, other=-2147483647)


@triton.jit
def _tile_seen(kpos, qpos_max):
    """Whether any key of a tile (positions [BLOCK_N]) is visible to a query at position qpos_max."""
    return tl.min(kpos, 0) <= qpos_max


@triton.jit
def _visible(key_ok, kpos, qpos, HAS_POS: tl.constexpr):
    """[BLOCK_M, BLOCK_N] (or [1, BLOCK_N] without positions): key n attendable and its position <= query m's."""
    ok = key_ok[None, :]
    if HAS_POS:
        ok = ok & (kpos[None, :] <= qpos[:, None])
    return ok
