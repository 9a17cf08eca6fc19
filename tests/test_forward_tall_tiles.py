"""The CUDA forward's 128-row CTAs (32 query rows per warp, two m16 row blocks sharing each K/V fragment; from
D = 64 on the warp's Q rows are read from shared memory) that it launches from Lq = 128 on (D <= 80; wider heads
keep 64-row CTAs): odd query lengths, masks, several sources, forced splits, grouped heads and a negative softmax
scale, against a float64 reference (on the emulator where no GPU is present)."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from mplug_kernels.backends.kernel_inputs import force_num_splits
from mplug_kernels.occupancy import forward_rows_per_cta
from attention_testing import (
    assert_within_budget,
    low_precision_baseline,
    make_mask,
    random_tensor,
    reference64,
    skip_unless_supported,
)

# (batch, Lq, Hq, Hkv, D, source lengths, mask kind, dtype, forced splits, scale: None for D ** -0.5): the emulator
# is slow, so few cases
CASES = [
    (1, 129, 1, 1, 32, (131,), "none", torch.bfloat16, None, None),            # one row past the first 128-row tile
    (2, 200, 2, 2, 32, (25, 150), "padding", torch.float16, None, None),       # two sources, a tile spanning them
    (2, 200, 1, 1, 32, (190,), "one_row_fully_masked", torch.bfloat16, None, None),
    (1, 577, 1, 1, 32, (577,), "padding", torch.bfloat16, None, None),         # the connected layer's length
    (1, 200, 2, 2, 32, (300,), "padding", torch.bfloat16, 3, None),            # forced split-KV partials
    (1, 129, 4, 2, 32, (70, 13), "one_row_fully_masked", torch.float16, None, None),  # grouped heads
    # D = 64 and 80: Q read from shared memory
    (1, 200, 1, 1, 64, (140,), "padding", torch.bfloat16, None, None),
    (2, 131, 2, 1, 64, (25, 120), "one_row_fully_masked", torch.float16, None, None),
    (1, 150, 1, 1, 64, (90,), "padding", torch.float16, None, -0.11),          # negative scale: Q negated in shared memory
    (1, 140, 1, 1, 80, (100,), "padding", torch.bfloat16, 2, None),
    (1, 150, 1, 1, 128, (100,), "padding", torch.float16, None, None),         # D = 128: 64-row CTAs from Lq 128 on
]


@pytest.fixture(autouse=True)
def _restore_split_heuristic():
    yield
    force_num_splits(None)


@pytest.mark.parametrize("batch, q_len, q_heads, kv_heads, head_dim, k_lens, mask_kind, dtype, splits, scale", CASES)
def test_cuda_tall_tile_forward_matches_reference(batch, q_len, q_heads, kv_heads, head_dim, k_lens, mask_kind,
                                                  dtype, splits, scale):
    generator = torch.Generator().manual_seed(q_len + head_dim)
    make = lambda length, heads: random_tensor(batch, length, heads, head_dim, dtype=dtype, generator=generator)
    q = make(q_len, q_heads)
    ks = [make(length, kv_heads) for length in k_lens]
    vs = [make(length, kv_heads) for length in k_lens]
    masks = [make_mask(mask_kind, batch, length, generator) for length in k_lens]
    if mask_kind == "one_row_fully_masked":
        for mask in masks:
            mask[0] = False
    skip_unless_supported("cuda", q, ks, vs, masks)
    force_num_splits(splits)
    inputs = [x.clone() for x in (q, *ks, *vs)]
    out, lse = mplug_kernels.concat_attention(q, ks, vs, masks, return_lse=True, backend="cuda", softmax_scale=scale)
    group = q_heads // kv_heads
    ks_rep, vs_rep = [k.repeat_interleave(group, dim=2) for k in ks], [v.repeat_interleave(group, dim=2) for v in vs]
    scale = head_dim ** -0.5 if scale is None else scale
    _, _, _, out_ref, lse_ref = reference64(q, ks_rep, vs_rep, masks, scale)
    out_base, lse_base = low_precision_baseline(q, ks_rep, vs_rep, masks, scale)
    assert_within_budget("out", out, out_ref, out_base, factor=2)
    assert_within_budget("lse", lse, lse_ref, lse_base, factor=2, slack=1e-4)
    if mask_kind == "one_row_fully_masked":
        assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    assert all(torch.equal(before, after) for before, after in zip(inputs, (q, *ks, *vs)))


@pytest.mark.parametrize("q_len, head_dim, rows", [(127, 32, 64), (128, 32, 128), (577, 32, 128), (127, 64, 64),
                                                   (602, 64, 128), (602, 80, 128), (602, 96, 64), (602, 128, 64)])
def test_python_mirror_of_the_cuda_rows_per_cta(q_len, head_dim, rows):
    """occupancy.forward_rows_per_cta mirrors csrc/attention.h: 128-row CTAs from Lq = 128 on where D <= 80."""
    assert forward_rows_per_cta("cuda", q_len, head_dim, 2) == rows
