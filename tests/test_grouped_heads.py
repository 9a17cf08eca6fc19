"""Grouped K/V heads (GQA, MQA): q [B, Lq, Hq, D] with k, v [B, Lk, Hkv, D], Hkv dividing Hq, on every backend,
forward and backward, against a float64 reference; the budget is PyTorch's own low-precision attention on K/V
heads repeated (test-side copies only: the kernels map query head h to K/V head h // (Hq // Hkv))."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from attention_testing import (
    assert_within_budget,
    grads,
    low_precision_baseline,
    make_mask,
    random_tensor,
    reference64,
    skip_unless_supported,
)
from mplug_kernels import reference
from mplug_kernels.backends import AttentionCall, Backend

BATCH, HEAD_DIM = 2, 32
HEAD_PAIRS = [(4, 1), (4, 2), (4, 4), (7, 7), (14, 2)]  # (Hq, Hkv): groups of 4, 2, 1, 1, 7
SOURCE_LENS = [(33,), (7, 40), (13, 1, 70)]  # 1-3 sources, odd lengths, tiles spanning sources
BACKEND_DTYPES = [("reference", torch.float32), ("sdpa", torch.float32), ("triton", torch.float32),
                  ("triton", torch.float16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
MASK_KINDS = ["padding", "one_row_fully_masked"]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _inputs(heads, k_lens, dtype, mask_kind, seed, q_len=25, requires_grad=False):
    """q [B, Lq, Hq, D], sources [B, Lk_i, Hkv, D] and one mask per source (batch element 0 fully masked in every
    source for one_row_fully_masked)."""
    q_heads, kv_heads = heads
    generator = torch.Generator().manual_seed(seed)
    make = lambda length, h: random_tensor(BATCH, length, h, HEAD_DIM, dtype=dtype, generator=generator,
                                           requires_grad=requires_grad)
    q = make(q_len, q_heads)
    ks = [make(length, kv_heads) for length in k_lens]
    vs = [make(length, kv_heads) for length in k_lens]
    return q, ks, vs, [make_mask(mask_kind, BATCH, length, generator) for length in k_lens]


def _repeated(xs, group):
    """K/V [B, Lk, Hkv, D] with each head repeated group times (copies; for the test's baselines only)."""
    return [x.repeat_interleave(group, dim=2) for x in xs]


def _call(q, ks, vs, masks, backend):
    if len(ks) == 1:
        return mplug_kernels.co_attention(q, ks[0], vs[0], masks[0], return_lse=True, backend=backend)
    return mplug_kernels.concat_attention(q, ks, vs, masks, return_lse=True, backend=backend)


@pytest.mark.parametrize("heads", HEAD_PAIRS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_reference_equals_attention_on_repeated_heads(heads, mask_kind):
    q, ks, vs, masks = _inputs(heads, (7, 40), torch.float64, mask_kind, seed=heads[0] + 10 * heads[1],
                               requires_grad=True)
    group = heads[0] // heads[1]
    out, lse = reference.attention_forward(q, ks, vs, masks, 0.3)
    ks_rep, vs_rep = _repeated(ks, group), _repeated(vs, group)
    out_rep, lse_rep = reference.attention_forward(q, ks_rep, vs_rep, masks, 0.3)
    torch.testing.assert_close(out, out_rep, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, lse_rep, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    dq, dks, dvs = reference.attention_backward(dout, dlse, q, ks, vs, masks, out, lse, 0.3)
    expected = torch.autograd.grad([out_rep, _finite(lse_rep)], [q, *ks, *vs], [dout, dlse])
    for ours, want in zip([dq, *dks, *dvs], expected):
        torch.testing.assert_close(ours, want, rtol=0, atol=1e-10)


def _check(backend, dtype, heads, k_lens, mask_kind, seed, backward):
    q, ks, vs, masks = _inputs(heads, k_lens, dtype, mask_kind, seed, requires_grad=backward)
    skip_unless_supported(backend, q, ks, vs, masks, return_lse=backend != "sdpa")
    group = heads[0] // heads[1]
    scale = HEAD_DIM ** -0.5
    q64, ks64, vs64, out_ref, lse_ref = reference64(q, ks, vs, masks, scale)
    ks_rep, vs_rep = _repeated(ks, group), _repeated(vs, group)
    out_base, lse_base = low_precision_baseline(q, ks_rep, vs_rep, masks, scale)
    if backend == "sdpa":
        out = mplug_kernels.concat_attention(q, ks, vs, masks, backend=backend)
        lse = None
    else:
        out, lse = _call(q, ks, vs, masks, backend)
        assert lse.shape == (BATCH, heads[0], q.shape[1])
        assert_within_budget("lse", lse, lse_ref, lse_base, factor=2, slack=1e-4)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_budget("out", out, out_ref, out_base, factor=2)
    if mask_kind == "one_row_fully_masked":
        assert (out[0] == 0).all()
        assert lse is None or torch.isneginf(lse[0]).all()
    if not backward:
        return
    generator = torch.Generator().manual_seed(seed + 1)
    dout = random_tensor(*q.shape, dtype=dtype, generator=generator)
    dlse = random_tensor(BATCH, heads[0], q.shape[1], dtype=torch.float32, generator=generator)
    outputs, seeds = ([out], [dout]) if lse is None else ([out, _finite(lse)], [dout, dlse])
    ours = grads(outputs, [q, *ks, *vs], seeds)
    ref_outputs = [out_ref] if lse is None else [out_ref, _finite(lse_ref)]
    want = grads(ref_outputs, [q64, *ks64, *vs64], seeds)
    base_outputs = [out_base] if lse is None else [out_base, _finite(lse_base)]
    base = grads(base_outputs, [q, *ks, *vs], seeds)  # through repeat_interleave: summed over each group
    names = ["dq"] + [f"dk{i}" for i in range(len(ks))] + [f"dv{i}" for i in range(len(vs))]
    for name, x, ref, b, like in zip(names, ours, want, base, [q, *ks, *vs]):
        assert x.shape == like.shape, name
        assert_within_budget(name, x, ref, b, factor=2, slack=1e-4)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("heads", HEAD_PAIRS)
@pytest.mark.parametrize("k_lens", SOURCE_LENS)
def test_forward_matches_float64_reference(backend, dtype, heads, k_lens):
    _check(backend, dtype, heads, k_lens, "padding", seed=sum(k_lens) + 100 * heads[1], backward=False)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("heads", HEAD_PAIRS)
@pytest.mark.parametrize("k_lens", SOURCE_LENS)
def test_backward_matches_float64_reference(backend, dtype, heads, k_lens):
    _check(backend, dtype, heads, k_lens, "padding", seed=3 * sum(k_lens) + heads[0], backward=True)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("heads", [(4, 1), (14, 2)])
def test_fully_masked_rows_give_zero_and_minus_inf(backend, dtype, heads):
    _check(backend, dtype, heads, (7, 40), "one_row_fully_masked", seed=7, backward=True)


@pytest.mark.parametrize("backend,dtype", [pair for pair in BACKEND_DTYPES if pair[0] in ("triton", "cuda")])
@pytest.mark.parametrize("heads", [(4, 1), (14, 2)])
def test_deterministic_dq_kernel(backend, dtype, heads):
    """The dQ kernel without atomics (deterministic algorithms) maps query heads to K/V heads too."""
    torch.use_deterministic_algorithms(True)
    try:
        _check(backend, dtype, heads, (13, 1, 70), "padding", seed=11, backward=True)
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton", "cuda"])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 3), (7, 2), (2, 4)])
def test_non_dividing_kv_heads_raise_naming_both_counts(backend, q_heads, kv_heads):
    generator = torch.Generator().manual_seed(0)
    q = random_tensor(BATCH, 5, q_heads, HEAD_DIM, dtype=torch.float16, generator=generator)
    k = random_tensor(BATCH, 9, kv_heads, HEAD_DIM, dtype=torch.float16, generator=generator)
    with pytest.raises(ValueError, match=rf"{kv_heads} key/value heads but q has {q_heads} heads"):
        mplug_kernels.co_attention(q, k, k, backend=backend)
    with pytest.raises(ValueError, match=rf"{kv_heads} key/value heads but q has {q_heads} heads"):
        mplug_kernels.concat_attention(q, (k, k), (k, k), backend=backend)


def test_sources_with_different_kv_heads_raise():
    generator = torch.Generator().manual_seed(0)
    q = random_tensor(BATCH, 5, 4, HEAD_DIM, dtype=torch.float32, generator=generator)
    k1 = random_tensor(BATCH, 9, 1, HEAD_DIM, dtype=torch.float32, generator=generator)
    k2 = random_tensor(BATCH, 9, 2, HEAD_DIM, dtype=torch.float32, generator=generator)
    with pytest.raises(ValueError, match=r"ks\[1\] has 2 key/value heads but an earlier key/value tensor has 1"):
        mplug_kernels.concat_attention(q, (k1, k2), (k1, k2), backend="reference")
    with pytest.raises(ValueError, match=r"v has 2 key/value heads but an earlier key/value tensor has 1"):
        mplug_kernels.co_attention(q, k1, k2, backend="reference")


def test_declared_support_names_grouped_heads():
    generator = torch.Generator().manual_seed(0)
    q = random_tensor(BATCH, 5, 4, HEAD_DIM, dtype=torch.float32, generator=generator)
    k = random_tensor(BATCH, 9, 2, HEAD_DIM, dtype=torch.float32, generator=generator)
    grouped = AttentionCall.of(q, [k], [k], [None], return_lse=False)
    plain = AttentionCall.of(q, [q], [q], [None], return_lse=False)
    assert grouped.kv_group == 2 and plain.kv_group == 1
    assert "takes no grouped K/V heads (2 query heads per K/V head)" in Backend().reasons(grouped)
    assert not any("grouped" in reason for reason in Backend().reasons(plain))
    assert "2 query heads per K/V head" in grouped.describe()


@pytest.mark.parametrize("heads", [(4, 1), (14, 2)])
def test_merge_of_grouped_partials_equals_joint_attention(heads):
    q, ks, vs, masks = _inputs(heads, (7, 40), torch.float32, "one_row_fully_masked", seed=5)
    parts = [mplug_kernels.co_attention(q, k, v, m, return_lse=True, backend="reference")
             for k, v, m in zip(ks, vs, masks)]
    out, lse = mplug_kernels.merge_attention_states([o for o, _ in parts], [l for _, l in parts])
    _, _, _, out_ref, lse_ref = reference64(q, ks, vs, masks, HEAD_DIM ** -0.5)
    torch.testing.assert_close(out.double(), out_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), lse_ref, rtol=0, atol=1e-5)
