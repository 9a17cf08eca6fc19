"""Positional visibility: key j of source i is visible to query t iff key_positions[i][b, j] <= query_positions[b, t]
(and its padding mask keeps it), on every backend that declares it, forward and backward, against float64.

The scenarios are the ones the rule exists for: causal text, mPLUG-Owl3's images (an image's keys carry the text
position of the image), a prefix-LM, and queries that see no key at all (zeros, lse -inf). The oracle of the
reference is a dense [B, Lq, Lk] mask built key by key in Python; the error budget of the kernels is PyTorch's own
low-precision attention under that dense mask on K/V heads repeated (flash-attn's 2x rule)."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from attention_testing import DEVICE, assert_within_budget, grads, random_tensor
from mplug_kernels import reference
from mplug_kernels.backends import BACKENDS, AttentionCall, Backend
from mplug_kernels.backends.base import Positions

BATCH, HEAD_DIM = 2, 32
HEAD_PAIRS = [(4, 4), (4, 2), (4, 1), (7, 1)]  # query heads per K/V head: 1, 2, 4, 7
BACKEND_DTYPES = [("reference", torch.float32), ("sdpa", torch.float32), ("triton", torch.float32),
                  ("triton", torch.float16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
SCENARIOS = ["causal", "owl3_images", "prefix_lm", "invisible_rows", "four_sources"]


def _int32(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.int32, device=DEVICE)


def scenario(name: str, generator):
    """(source lengths, key positions per source (None = always visible), query positions [B, Lq], padding masks)."""
    text = 21
    causal = _int32([list(range(text))] * BATCH)
    if name == "causal":  # text self-attention: positions are token indices
        return (text,), [causal], causal, [None]
    if name == "owl3_images":  # 2 images of 9 keys at text positions 3 and 12 (row 0), 0 and 17 (row 1); padded text
        images = _int32([[3] * 9 + [12] * 9, [0] * 9 + [17] * 9])
        padding = torch.ones(BATCH, text, dtype=torch.bool, device=DEVICE)
        padding[1, 15:] = False
        return (18, text), [images, causal], causal, [None, padding]
    if name == "prefix_lm":  # 6 prefix tokens seen by everyone, then causal
        prefix = torch.clamp(causal - 5, min=0)
        return (text,), [prefix], causal, [None]
    if name == "invisible_rows":  # queries 0-4 of row 0 precede every key; row 1's visible keys are all padded
        keys = _int32([list(range(5, 5 + text))] * BATCH)
        padding = torch.ones(BATCH, text, dtype=torch.bool, device=DEVICE)
        padding[1, :8] = False
        return (text,), [keys], _int32([list(range(text)), [0, 1, 2] + [30] * (text - 3)]), [padding]
    lengths = (5, 33, 1, text)  # four_sources: an always-visible source, two images, causal text
    images = _int32([[2] * 33, [9] * 33])
    return lengths, [None, images, _int32([[20], [4]]), causal], causal, [None, None, None, None]


def inputs(name: str, heads, dtype, seed: int, requires_grad: bool):
    """q [B, Lq, Hq, D], sources [B, Lk_i, Hkv, D], masks and Positions of a scenario."""
    generator = torch.Generator().manual_seed(seed)
    lengths, key_positions, query_positions, masks = scenario(name, generator)
    make = lambda length, h: random_tensor(BATCH, length, h, HEAD_DIM, dtype=dtype, generator=generator,
                                           requires_grad=requires_grad)
    q = make(query_positions.shape[1], heads[0])
    ks = [make(length, heads[1]) for length in lengths]
    vs = [make(length, heads[1]) for length in lengths]
    return q, ks, vs, masks, Positions(tuple(key_positions), query_positions)


def dense_visibility(ks, masks, positions) -> torch.Tensor:
    """bool [B, Lq, sum Lk] built key by key from the rule (the oracle's own mask)."""
    batch, q_len = positions.queries.shape
    columns = []
    for k, mask, key_pos in zip(ks, masks, positions.keys):
        for j in range(k.shape[1]):
            column = torch.ones(batch, q_len, dtype=torch.bool, device=DEVICE)
            if key_pos is not None:
                column &= key_pos[:, j, None] <= positions.queries
            if mask is not None:
                column &= mask[:, j, None]
            columns.append(column)
    return torch.stack(columns, dim=-1)


def dense_attention(q, ks, vs, visible, scale, dtype):
    """(out, lse) of q over cat(ks) with K/V heads repeated, scores masked densely, in dtype (lse float)."""
    group = q.shape[2] // ks[0].shape[2]
    k = torch.cat(ks, dim=1).repeat_interleave(group, dim=2).to(dtype)
    v = torch.cat(vs, dim=1).repeat_interleave(group, dim=2).to(dtype)
    scores = torch.einsum("bqhd,bkhd->bhqk", q.to(dtype), k) * scale
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    alive = visible.any(-1)[:, None, :, None]
    wide = scores.masked_fill(~alive, 0).to(torch.float64 if dtype == torch.float64 else torch.float32)
    lse = torch.logsumexp(wide, dim=-1).masked_fill(~alive[..., 0], float("-inf"))
    probs = torch.softmax(wide, dim=-1).masked_fill(~alive, 0).to(dtype)
    return torch.einsum("bhqk,bkhd->bqhd", probs, v), lse


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _call(q, ks, vs, masks, positions, backend, return_lse):
    if len(ks) == 1:
        return mplug_kernels.co_attention(q, ks[0], vs[0], masks[0], key_positions=positions.keys[0],
                                          query_positions=positions.queries, return_lse=return_lse, backend=backend)
    return mplug_kernels.concat_attention(q, ks, vs, masks, key_positions=positions.keys,
                                          query_positions=positions.queries, return_lse=return_lse, backend=backend)


@pytest.mark.parametrize("name", SCENARIOS)
@pytest.mark.parametrize("heads", [(4, 2), (7, 1)])
def test_reference_matches_dense_mask_oracle(name, heads):
    q, ks, vs, masks, positions = inputs(name, heads, torch.float64, seed=len(name), requires_grad=True)
    visible = dense_visibility(ks, masks, positions)
    out, lse = reference.attention_forward(q, ks, vs, masks, 0.3, positions)
    want_out, want_lse = dense_attention(q, ks, vs, visible, 0.3, torch.float64)
    torch.testing.assert_close(out, want_out, rtol=0, atol=1e-12)
    torch.testing.assert_close(lse.double(), want_lse.double(), rtol=0, atol=1e-12)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    ours = reference.attention_backward(dout, dlse, q, ks, vs, masks, out, lse, 0.3, positions)
    want = torch.autograd.grad([want_out, _finite(want_lse)], [q, *ks, *vs], [dout, dlse])
    for got, expected in zip([ours[0], *ours[1], *ours[2]], want):
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def _check(backend, dtype, heads, name, seed, backward):
    q, ks, vs, masks, positions = inputs(name, heads, dtype, seed, requires_grad=backward)
    _compare(backend, dtype, q, ks, vs, masks, positions, seed, backward)


def _compare(backend, dtype, q, ks, vs, masks, positions, seed, backward):
    """backend's out, lse (and gradients when backward) within 2x PyTorch's own error of the float64 dense oracle."""
    return_lse = backend != "sdpa"
    reasons = BACKENDS[backend].reasons(AttentionCall.of(q, ks, vs, masks, return_lse, positions))
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")
    scale = HEAD_DIM ** -0.5
    visible = dense_visibility(ks, masks, positions)
    up = lambda xs: [x.detach().double().requires_grad_(backward) for x in xs]
    q64, ks64, vs64 = up([q])[0], up(ks), up(vs)
    out_ref, lse_ref = dense_attention(q64, ks64, vs64, visible, scale, torch.float64)
    out_base, lse_base = dense_attention(q, ks, vs, visible, scale, dtype)
    result = _call(q, ks, vs, masks, positions, backend, return_lse)
    out, lse = result if return_lse else (result, None)
    assert out.shape == q.shape and out.dtype == dtype
    assert_within_budget("out", out, out_ref, out_base, factor=2)
    dead = ~visible.any(-1)
    assert (out[dead] == 0).all()
    if lse is not None:
        assert_within_budget("lse", lse, lse_ref, lse_base, factor=2, slack=1e-4)
        assert torch.isneginf(lse.transpose(1, 2)[dead]).all()
    if not backward:
        return
    generator = torch.Generator().manual_seed(seed + 1)
    dout = random_tensor(*q.shape, dtype=dtype, generator=generator)
    dlse = random_tensor(*lse_ref.shape, dtype=torch.float32, generator=generator)
    pick = lambda o, l: [o] if lse is None else [o, _finite(l)]
    seeds = [dout] if lse is None else [dout, dlse]
    ours = grads(pick(out, lse), [q, *ks, *vs], seeds)
    want = grads(pick(out_ref, lse_ref), [q64, *ks64, *vs64], seeds)
    base = grads(pick(out_base, lse_base), [q, *ks, *vs], seeds)
    names = ["dq"] + [f"dk{i}" for i in range(len(ks))] + [f"dv{i}" for i in range(len(vs))]
    for grad_name, x, ref, b in zip(names, ours, want, base):
        assert_within_budget(grad_name, x, ref, b, factor=2, slack=1e-4)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("heads", HEAD_PAIRS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_forward_matches_float64(backend, dtype, heads, name):
    _check(backend, dtype, heads, name, seed=heads[0] * 10 + heads[1], backward=False)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("heads", [(4, 4), (7, 1)])
@pytest.mark.parametrize("name", SCENARIOS)
def test_backward_matches_float64(backend, dtype, heads, name):
    _check(backend, dtype, heads, name, seed=heads[0] + 3 * heads[1], backward=True)


def test_inputs_are_not_modified():
    q, ks, vs, masks, positions = inputs("owl3_images", (4, 2), torch.float32, seed=3, requires_grad=False)
    before = [x.clone() for x in (q, *ks, *vs, positions.keys[0], positions.queries)]
    _call(q, ks, vs, masks, positions, "reference", return_lse=True)
    for x, y in zip(before, (q, *ks, *vs, positions.keys[0], positions.queries)):
        assert torch.equal(x, y)


@pytest.mark.parametrize("bad,match", [
    ({"query_positions": None}, r"key_positions is given but query_positions is None"),
    ({"key_positions": None}, r"query_positions is given but no source has key positions"),
    ({"key_positions": torch.zeros(BATCH, 9, dtype=torch.int64)}, r"key_positions must have dtype torch.int32"),
    ({"key_positions": torch.zeros(BATCH, 8, dtype=torch.int32)}, r"key_positions must have shape \[B, L\] = \(2, 9\)"),
    ({"query_positions": torch.zeros(BATCH, 6, dtype=torch.int32)}, r"query_positions must have shape \[B, L\] = \(2, 5\)"),
    ({"query_positions": [0, 1]}, r"query_positions must be an int32 torch.Tensor or None, got list"),
])
def test_bad_positions_raise_naming_the_argument(bad, match):
    generator = torch.Generator().manual_seed(0)
    q = random_tensor(BATCH, 5, 2, HEAD_DIM, dtype=torch.float32, generator=generator)
    k = random_tensor(BATCH, 9, 2, HEAD_DIM, dtype=torch.float32, generator=generator)
    kwargs = {"key_positions": torch.zeros(BATCH, 9, dtype=torch.int32, device=DEVICE),
              "query_positions": torch.zeros(BATCH, 5, dtype=torch.int32, device=DEVICE), **bad}
    with pytest.raises((ValueError, TypeError), match=match):
        mplug_kernels.co_attention(q, k, k, backend="reference", **kwargs)


def test_concat_attention_with_query_tuple_takes_one_position_tensor_per_query():
    q, ks, vs, masks, positions = inputs("owl3_images", (4, 2), torch.float32, seed=4, requires_grad=False)
    halves = (q[:, :10], q[:, 10:])
    query_halves = (positions.queries[:, :10], positions.queries[:, 10:])
    outs = mplug_kernels.concat_attention(halves, ks, vs, masks, key_positions=positions.keys,
                                          query_positions=query_halves, backend="reference")
    whole = _call(q, ks, vs, masks, positions, "reference", return_lse=False)
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="query_positions must be a tuple of as many"):
        mplug_kernels.concat_attention(halves, ks, vs, masks, key_positions=positions.keys,
                                       query_positions=positions.queries, backend="reference")


def test_declared_support_names_positions():
    q, ks, vs, masks, positions = inputs("causal", (4, 2), torch.float32, seed=0, requires_grad=False)
    call = AttentionCall.of(q, ks, vs, masks, return_lse=False, positions=positions)
    assert call.has_positions and "positions=True" in call.describe()
    assert "takes no key/query positions" in Backend().reasons(call)
    assert not BACKENDS["reference"].reasons(call)


def _splits_inputs(dtype, heads, requires_grad):
    """200 keys in two sources (an image source whose second image is at position 40, text at 50-119 whose first
    64 keys are padded in row 1) and 70 queries: row 0 from position -1 (sees no key) up, row 1 down to 0, so
    whole key splits and tiles are invisible to some query tiles and rows."""
    generator = torch.Generator().manual_seed(5)
    lengths, q_len = (130, 70), 70
    key_positions = [_int32([[3] * 64 + [40] * 66, [0] * 130]), _int32([list(range(50, 120))] * BATCH)]
    query_positions = _int32([list(range(-1, q_len - 1)), list(range(2 * q_len - 1, -1, -2))])
    padding = torch.ones(BATCH, lengths[1], dtype=torch.bool, device=DEVICE)
    padding[1, :64] = False
    make = lambda length, h: random_tensor(BATCH, length, h, HEAD_DIM, dtype=dtype, generator=generator,
                                           requires_grad=requires_grad)
    q = make(q_len, heads[0])
    ks, vs = [make(n, heads[1]) for n in lengths], [make(n, heads[1]) for n in lengths]
    return q, ks, vs, [None, padding], Positions(tuple(key_positions), query_positions)


@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float16), ("cuda", torch.bfloat16)])
@pytest.mark.parametrize("num_splits", [3, 4])
def test_forced_splits_with_invisible_splits(backend, dtype, num_splits):
    """Split-KV under positions: a split whose keys a row cannot see adds nothing to its merge (forward and backward)."""
    from mplug_kernels.backends.kernel_inputs import force_num_splits
    force_num_splits(num_splits)
    try:
        _compare(backend, dtype, *_splits_inputs(dtype, (4, 2), requires_grad=True), seed=5, backward=True)
    finally:
        force_num_splits(None)


@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float16), ("cuda", torch.bfloat16)])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_deterministic_backward(backend, dtype, heads):
    """The dQ kernel without atomics (deterministic algorithms) under positions: the same gradients within budget, and
    bit-identical on a second run."""
    torch.use_deterministic_algorithms(True)
    try:
        _compare(backend, dtype, *_splits_inputs(dtype, heads, requires_grad=True), seed=7, backward=True)
        q, ks, vs, masks, positions = _splits_inputs(dtype, heads, requires_grad=True)
        runs = [grads([_call(q, ks, vs, masks, positions, backend, return_lse=False)], [q], [torch.ones_like(q)])[0]
                for _ in range(2)]
        assert torch.equal(runs[0], runs[1])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_splits", [2, 3, 4])
def test_triton_forced_splits_with_invisible_splits(dtype, num_splits):
    """The Triton split-KV forward and its combine under positions: splits a row cannot see give lse -inf partials."""
    test_forced_splits_with_invisible_splits("triton", dtype, num_splits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_triton_deterministic_backward(dtype, heads):
    """The Triton dQ kernel without atomics under positions: within budget and bit-identical on a second run."""
    test_deterministic_backward("triton", dtype, heads)


@pytest.mark.parametrize("deterministic", [False, True])
def test_triton_nan_in_queries_that_see_no_key(deterministic):
    """A NaN query row that sees no key (positions, no Python pre-pass) gives zeros, lse -inf and the gradients of
    a zero row: no NaN reaches dK (0 * NaN) or anything else."""
    q, ks, vs, masks, positions = inputs("invisible_rows", (4, 2), torch.float32, seed=9, requires_grad=False)
    dead = ~dense_visibility(ks, masks, positions).any(-1)
    poisoned = q.masked_fill(dead[:, :, None, None], float("nan"))
    clean = q.masked_fill(dead[:, :, None, None], 0.0)
    reasons = BACKENDS["triton"].reasons(AttentionCall.of(q, ks, vs, masks, True, positions))
    if reasons:
        pytest.skip(f"backend triton: {'; '.join(reasons)}")
    torch.use_deterministic_algorithms(deterministic)
    try:
        results = []
        for query in (poisoned, clean):
            leaves = [x.clone().requires_grad_() for x in (query, *ks, *vs)]
            out, lse = _call(leaves[0], leaves[1:2], leaves[2:], masks, positions, "triton", return_lse=True)
            results.append([out, lse, *grads([out, _finite(lse)], leaves, [torch.ones_like(out), torch.ones_like(lse)])])
    finally:
        torch.use_deterministic_algorithms(False)
    assert (results[0][0][dead] == 0).all() and torch.isneginf(results[0][1].transpose(1, 2)[dead]).all()
    for got, want in zip(results[0], results[1]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("backend,dtype", [("cuda", torch.float16), ("cuda", torch.bfloat16)])
def test_interleaved_key_positions(backend, dtype):
    """Two interleaved key streams (even keys at 0-63, odd keys from 1001 on): the first 20 queries (positions
    70-89) see only the even keys of a tile whose even keys they all see, the last 20 see some odd keys too."""
    generator = torch.Generator().manual_seed(9)
    keys = [j // 2 if j % 2 == 0 else 1000 + j for j in range(128)]
    queries = [70 + r for r in range(20)] + [1000 + 4 * r for r in range(20, 40)]
    positions = Positions((_int32([keys] * BATCH),), _int32([queries] * BATCH))
    make = lambda length, h: random_tensor(BATCH, length, h, HEAD_DIM, dtype=dtype, generator=generator,
                                           requires_grad=True)
    q, k, v = make(len(queries), 4), make(len(keys), 2), make(len(keys), 2)
    _compare(backend, dtype, q, [k], [v], [None], positions, seed=9, backward=True)


def _strided(rows):
    """rows [B, L] as a view with stride 2 along L (None stays None)."""
    return None if rows is None else torch.stack([rows, rows], dim=-1)[..., 0]


@pytest.mark.parametrize("backend,dtype", [("triton", torch.float32), ("cuda", torch.float16)])
def test_strided_position_and_mask_rows_give_the_contiguous_result(backend, dtype):
    """Key/query positions and masks whose L stride is not 1 reach the kernels as unit-stride rows."""
    q, ks, vs, masks, positions = inputs("owl3_images", (4, 2), dtype, seed=5, requires_grad=False)
    strided = Positions(tuple(_strided(p) for p in positions.keys), _strided(positions.queries))
    assert strided.queries.stride(-1) == 2 and any(m is not None for m in masks)
    want = _call(q, ks, vs, masks, positions, backend, return_lse=True)
    got = _call(q, ks, vs, [_strided(m) for m in masks], strided, backend, return_lse=True)
    for x, y in zip(got, want):
        assert torch.equal(x, y)
