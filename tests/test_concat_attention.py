"""concat_attention against a float64 torch.cat reference: 1-4 key sources, tuple queries, masks, gradients."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from attention_testing import (
    DEVICE,
    KERNEL_BACKENDS,
    LOW_PRECISION_DTYPES,
    ON_GPU,
    TEST_DTYPES,
    assert_within_budget,
    grads,
    low_precision_baseline,
    make_mask,
    random_tensor,
    reference64,
    skip_unless_supported,
    widest_dtype,
)

BATCH, HEADS, HEAD_DIM = 2, 2, 64
# Key source lengths from {1, 7, 25, 257, 577}; the CPU interpreter is slow, so it runs a subset.
SOURCE_LENS = [(1,), (577,), (7, 25), (577, 25), (257, 1, 7), (25, 7, 1, 257), (577, 257, 25, 7), (1, 1, 1, 1)]
CPU_SOURCE_LENS = [(1,), (577,), (7, 25), (577, 25), (257, 1, 7), (25, 7, 1, 257)]
GRID_SOURCE_LENS = SOURCE_LENS if ON_GPU else CPU_SOURCE_LENS
BACKWARD_SOURCE_LENS = SOURCE_LENS if ON_GPU else [(1,), (7, 25), (257, 1, 7), (25, 7, 1, 1)]
QUERY_LENS = [(25,), (7, 1)]  # a single query tensor, and a tuple of two query sources
MASK_KINDS = ["none", "padding", "one_source_fully_masked", "one_row_fully_masked"]


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _masks(kind, lens, generator):
    if kind == "none":
        return None
    masks = [make_mask("padding", BATCH, length, generator) for length in lens]
    if kind == "one_source_fully_masked":
        masks[0] = torch.zeros_like(masks[0])
    if kind == "one_row_fully_masked":
        for mask in masks:
            mask[0] = False
    return tuple(masks)


def _inputs(q_lens, k_lens, dtype, mask_kind, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    make = lambda length: random_tensor(
        BATCH, length, HEADS, HEAD_DIM, dtype=dtype, generator=generator, requires_grad=requires_grad
    )
    queries = tuple(make(length) for length in q_lens)
    ks = tuple(make(length) for length in k_lens)
    vs = tuple(make(length) for length in k_lens)
    return queries, ks, vs, _masks(mask_kind, k_lens, generator)


def _call(queries, ks, vs, masks, backend, return_lse=True):
    """concat_attention with a tensor q for one query source and a tuple otherwise; always returns tuples."""
    q = queries if len(queries) > 1 else queries[0]
    result = mplug_kernels.concat_attention(q, ks, vs, masks, return_lse=return_lse, backend=backend)
    if not return_lse:
        return result if len(queries) > 1 else (result,)
    outs, lses = result
    return (outs, lses) if len(queries) > 1 else ((outs,), (lses,))


def _joined_queries(queries):
    return torch.cat([q.detach() for q in queries], dim=1).requires_grad_(queries[0].requires_grad)


def _split_queries(x, queries, dim=1):
    return x.split([q.shape[1] for q in queries], dim=dim)


def _check_forward(backend, queries, ks, vs, masks):
    mask_list = list(masks or [None] * len(ks))
    skip_unless_supported(backend, queries[0], ks, vs, mask_list)
    outs, lses = _call(queries, ks, vs, masks, backend)
    joined = _joined_queries(queries)
    _, _, _, out_ref, lse_ref = reference64(joined, ks, vs, mask_list, HEAD_DIM ** -0.5)
    out_base, lse_base = low_precision_baseline(joined, ks, vs, mask_list, HEAD_DIM ** -0.5)
    pieces = zip(outs, lses, _split_queries(out_ref, queries), _split_queries(lse_ref, queries, 2),
                 _split_queries(out_base, queries), _split_queries(lse_base, queries, 2), queries)
    for out, lse, o_ref, l_ref, o_base, l_base, q in pieces:
        assert out.shape == q.shape and out.dtype == q.dtype
        assert lse.shape == (BATCH, HEADS, q.shape[1]) and lse.dtype == torch.float32
        assert_within_budget("out", out, o_ref, o_base, factor=2)
        assert_within_budget("lse", lse, l_ref, l_base, factor=2, slack=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("q_lens", QUERY_LENS)
@pytest.mark.parametrize("k_lens", GRID_SOURCE_LENS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_forward_matches_cat_reference(backend, dtype, k_lens, q_lens):
    _check_forward(backend, *_inputs(q_lens, k_lens, dtype, "padding", seed=sum(k_lens) * 31 + len(q_lens)))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_mask_kinds(backend, mask_kind):
    _check_forward(backend, *_inputs((7, 1), (25, 257, 7), LOW_PRECISION_DTYPES[0], mask_kind, seed=3))


def _check_backward(backend, queries, ks, vs, masks):
    mask_list = list(masks or [None] * len(ks))
    skip_unless_supported(backend, queries[0], ks, vs, mask_list)
    generator = torch.Generator().manual_seed(1)
    douts = [random_tensor(*q.shape, dtype=q.dtype, generator=generator) for q in queries]
    dlses = [random_tensor(BATCH, HEADS, q.shape[1], dtype=torch.float32, generator=generator) for q in queries]
    outs, lses = _call(queries, ks, vs, masks, backend)
    ours = grads([*outs, *map(_finite, lses)], [*queries, *ks, *vs], douts + dlses)
    joined = _joined_queries(queries)
    q64, ks64, vs64, out_ref, lse_ref = reference64(joined, ks, vs, mask_list, HEAD_DIM ** -0.5)
    dout, dlse = torch.cat(douts, dim=1), torch.cat(dlses, dim=2)
    dq_ref, *dkv_ref = grads([out_ref, _finite(lse_ref)], [q64, *ks64, *vs64], [dout, dlse])
    out_base, lse_base = low_precision_baseline(joined, ks, vs, mask_list, HEAD_DIM ** -0.5)
    dq_base, *dkv_base = grads([out_base, _finite(lse_base)], [joined, *ks, *vs], [dout, dlse])
    expected = [*_split_queries(dq_ref, queries), *dkv_ref]
    baseline = [*_split_queries(dq_base, queries), *dkv_base]
    names = [f"dq[{i}]" for i in range(len(queries))] + [f"dk[{i}]" for i in range(len(ks))] + [f"dv[{i}]" for i in range(len(vs))]
    for name, g, g_ref, g_base in zip(names, ours, expected, baseline):
        assert g.dtype == queries[0].dtype
        assert_within_budget(name, g, g_ref, g_base, factor=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("k_lens", BACKWARD_SOURCE_LENS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_backward_matches_cat_reference(backend, dtype, k_lens):
    _check_backward(backend, *_inputs((7, 1), k_lens, dtype, "padding", seed=sum(k_lens), requires_grad=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("mask_kind", ["one_source_fully_masked", "one_row_fully_masked"])
def test_backward_with_fully_masked(backend, mask_kind):
    _check_backward(backend, *_inputs((5,), (7, 25), widest_dtype(backend), mask_kind, seed=4, requires_grad=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
def test_fully_masked_row_gives_zeros_not_nan(backend):
    queries, ks, vs, masks = _inputs((5, 3), (7, 25), widest_dtype(backend), "one_row_fully_masked", seed=5, requires_grad=True)
    skip_unless_supported(backend, queries[0], ks, vs, list(masks), return_lse=False)
    outs = _call(queries, ks, vs, masks, backend, return_lse=False)
    for out in outs:
        assert torch.equal(out[0], torch.zeros_like(out[0]))
    seeds = [torch.randn_like(out) for out in outs]
    for g in torch.autograd.grad(outs, [*queries, *ks, *vs], seeds):
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
def test_non_contiguous_inputs(backend):
    generator = torch.Generator().manual_seed(11)
    dtype = LOW_PRECISION_DTYPES[0] if backend != "reference" else torch.float32
    # Query sources sliced from a wider head axis, each K/V pair strided views of one packed tensor, masks column slices.
    queries = tuple(random_tensor(BATCH, n, 2 * HEADS, HEAD_DIM, dtype=dtype, generator=generator)[:, :, ::2] for n in (7, 1))
    packed = [random_tensor(BATCH, n, 2, HEADS, HEAD_DIM, dtype=dtype, generator=generator) for n in (25, 257)]
    ks, vs = tuple(kv[:, :, 0] for kv in packed), tuple(kv[:, :, 1] for kv in packed)
    masks = tuple(make_mask("padding", BATCH, 2 * n, generator)[:, ::2] for n in (25, 257))
    assert not any(x.is_contiguous() for x in (*queries, *ks, *vs, *masks))
    skip_unless_supported(backend, queries[0], ks, vs, list(masks), return_lse=False)
    outs = _call(queries, ks, vs, masks, backend, return_lse=False)
    joined = _joined_queries(queries)
    _, _, _, out_ref, _ = reference64(joined, ks, vs, list(masks), HEAD_DIM ** -0.5)
    out_base, _ = low_precision_baseline(joined, ks, vs, list(masks), HEAD_DIM ** -0.5)
    for out, o_ref, o_base in zip(outs, _split_queries(out_ref, queries), _split_queries(out_base, queries)):
        assert_within_budget("out", out, o_ref, o_base, factor=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
def test_inputs_are_not_modified(backend):
    queries, ks, vs, masks = _inputs((7, 1), (25, 7), widest_dtype(backend), "padding", seed=6, requires_grad=True)
    skip_unless_supported(backend, queries[0], ks, vs, list(masks))
    tensors = [*queries, *ks, *vs, *masks]
    before = [t.detach().clone() for t in tensors]
    outs, _ = _call(queries, ks, vs, masks, backend)
    torch.autograd.grad(outs, [*queries, *ks, *vs], [torch.randn_like(o) for o in outs])
    for original, tensor in zip(before, tensors):
        assert torch.equal(original, tensor.detach())


def test_return_types_follow_q():
    queries, ks, vs, masks = _inputs((7, 1), (25,), torch.float32, "none", seed=7)
    single = mplug_kernels.concat_attention(queries[0], ks, vs, backend="reference")
    assert isinstance(single, torch.Tensor)
    pair = mplug_kernels.concat_attention(list(queries), ks, vs, backend="reference")
    assert isinstance(pair, tuple) and [o.shape for o in pair] == [q.shape for q in queries]
    outs, lses = mplug_kernels.concat_attention(queries, ks, vs, return_lse=True, backend="reference")
    assert len(outs) == len(lses) == 2 and lses[1].shape == (BATCH, HEADS, 1)


def _bad_inputs():
    generator = torch.Generator().manual_seed(8)
    make = lambda *shape, dtype=torch.float32: random_tensor(*shape, dtype=dtype, generator=generator)
    q, k, v = make(BATCH, 5, HEADS, 32), make(BATCH, 9, HEADS, 32), make(BATCH, 9, HEADS, 32)
    keep = torch.ones(BATCH, 9, dtype=torch.bool, device=DEVICE)
    return {
        "ks not a tuple": ((q, k, (v,), None), TypeError, "ks must be a tuple"),
        "five sources": ((q, (k,) * 5, (v,) * 5, None), ValueError, "1 to 4 sources"),
        "ks and vs differ": ((q, (k, k), (v,), None), ValueError, "ks has 2 sources but vs has 1"),
        "mask count": ((q, (k,), (v,), (keep, keep)), ValueError, "key_padding_masks has 2 entries"),
        "masks not a tuple": ((q, (k,), (v,), keep), TypeError, "key_padding_masks must be None or a tuple"),
        "float mask": ((q, (k, k), (v, v), (None, keep.float())), TypeError, "key_padding_masks[1]"),
        "mask length": ((q, (k,), (v,), (keep[:, :4],)), ValueError, "key_padding_masks[0] must have shape"),
        "head dim": ((q, (k, make(BATCH, 9, HEADS, 16)), (v, v), None), ValueError, "ks[1] must be [B=2"),
        "value dtype": ((q, (k,), (v.double(),), None), TypeError, "vs[0] has dtype torch.float64"),
        "query dtype": (((q, q.half()), (k,), (v,), None), ValueError, "q[1]"),
        "query heads": (((q, make(BATCH, 5, 1, 32)), (k,), (v,), None), ValueError, "q[1]"),
        "empty query tuple": (((), (k,), (v,), None), ValueError, "non-empty tuple"),
        "no keys": ((q, (k[:, :0],), (v[:, :0],), None), ValueError, "ks[0] has no keys"),
        "integer q": ((q.long(), (k,), (v,), None), TypeError, "q[0] has unsupported dtype"),
    }


@pytest.mark.parametrize("case", list(_bad_inputs()))
def test_bad_input_raises_clear_error(case):
    args, error, message = _bad_inputs()[case]
    with pytest.raises(error, match=message.replace("[", r"\[").replace("]", r"\]")):
        mplug_kernels.concat_attention(*args, backend="reference")
