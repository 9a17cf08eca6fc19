"""Addressing and loading helpers (@triton.jit) that the forward and backward Triton kernels share.

Layout [B, S, H, D] with any strides (last dim contiguous); offsets 64-bit. Masked keys and values are selected
away, never multiplied by zero.
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
    offs_m, q_len, offs_d, head_dim,
):
    """q, dO tiles [BLOCK_M, BLOCK_D], their lse and delta rows, and which rows exist (backward)."""
    row_ok = offs_m < q_len
    q = _load_rows(Q, b, h, stride_qb, stride_qh, offs_m, stride_qm, offs_d, row_ok, head_dim)
    do = _load_rows(DO, b, h, stride_dob, stride_doh, offs_m, stride_dom, offs_d, row_ok, head_dim)
    lse = tl.load(LSE + bh * q_len + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(DELTA + bh * q_len + offs_m, mask=row_ok, other=0.0)
    return q, do, lse, delta, row_ok
