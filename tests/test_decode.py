"""Decoding over a cache whose valid length differs per batch row: key_lengths (int32 [B] per source) on every
backend that takes the call, against a float64 oracle that slices each row's valid keys (no mask at all).

A decode step is Lq = 1 per sequence, or several beams of one sequence folded into Lq (they share its cache). On a
GPU the step must not synchronise the host and must replay in a CUDA graph with new lengths (skipped elsewhere)."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from attention_testing import DEVICE, ON_GPU, assert_within_budget, low_precision_baseline, random_tensor
from mplug_kernels.backends import BACKENDS, AttentionCall

BATCH, HEAD_DIM, CACHE = 3, 32, 19
BACKEND_DTYPES = [("reference", torch.float32), ("sdpa", torch.float32), ("triton", torch.float32),
                  ("triton", torch.float16), ("cuda", torch.float16), ("cuda", torch.bfloat16)]
LENGTHS = [7, 19, 1]  # per batch row: part of the cache, all of it, one key


def _ids(combo) -> str:
    return f"{combo[0]}-{str(combo[1]).replace('torch.', '')}"


def _int32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def oracle(q, ks, vs, lengths, scale):
    """out [B, Lq, Hq, D] in float64: row b attends to cat_i(ks[i][b, :lengths[i][b]]) (None = every key)."""
    rows = []
    for b in range(q.shape[0]):
        kept = [slice(None) if n is None else slice(0, max(0, min(int(n[b]), k.shape[1])))
                for k, n in zip(ks, lengths)]
        k = torch.cat([k_i[b, keep] for k_i, keep in zip(ks, kept)]).double()
        v = torch.cat([v_i[b, keep] for v_i, keep in zip(vs, kept)]).double()
        if k.shape[0] == 0:
            rows.append(torch.zeros_like(q[b], dtype=torch.float64))
            continue
        group = q.shape[2] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("qhd,khd->hqk", q[b].double(), k) * scale, dim=-1)
        rows.append(torch.einsum("hqk,khd->qhd", probs, v))
    return torch.stack(rows)


def _length_masks(ks, lengths):
    """The bool masks [B, Lk_i] the lengths amount to (the low-precision baseline's input)."""
    return [None if n is None else torch.arange(k.shape[1], device=DEVICE)[None] < n.long()[:, None]
            for k, n in zip(ks, lengths)]


def _skip_unless_runs(backend, q, ks, vs, lengths):
    """Skip, with the dispatcher's reasons, when backend cannot run this call (gradients needed when q needs them)."""
    reasons = BACKENDS[backend].reasons(AttentionCall.of(q, ks, vs, _length_masks(ks, lengths), return_lse=False))
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")


def decode_inputs(dtype, beams: int, kv_heads: int, seed: int, requires_grad=False):
    """q [B, beams, 4, D], an image source [B, 11, Hkv, D] (always visible) and a text cache [B, CACHE, Hkv, D]."""
    generator = torch.Generator().manual_seed(seed)
    make = lambda length, heads: random_tensor(BATCH, length, heads, HEAD_DIM, dtype=dtype, generator=generator,
                                               requires_grad=requires_grad)
    return make(beams, 4), [make(11, kv_heads), make(CACHE, kv_heads)], [make(11, kv_heads), make(CACHE, kv_heads)]


@pytest.mark.parametrize("combo", BACKEND_DTYPES, ids=_ids)
@pytest.mark.parametrize("beams,kv_heads", [(1, 4), (3, 2), (5, 1)])
def test_co_attention_decode_with_key_lengths(combo, beams, kv_heads):
    backend, dtype = combo
    q, (_, k), (_, v) = decode_inputs(dtype, beams, kv_heads, seed=beams)
    lengths = _int32(LENGTHS)
    _skip_unless_runs(backend, q, [k], [v], [lengths])
    out = mplug_kernels.co_attention(q, k, v, key_lengths=lengths, backend=backend)
    scale = HEAD_DIM ** -0.5
    base, _ = low_precision_baseline(q, [k.repeat_interleave(4 // kv_heads, 2)],
                                     [v.repeat_interleave(4 // kv_heads, 2)], _length_masks([k], [lengths]), scale)
    assert_within_budget(f"{backend} decode out", out, oracle(q, [k], [v], [lengths], scale), base, 2.0)


@pytest.mark.parametrize("combo", BACKEND_DTYPES, ids=_ids)
def test_concat_attention_decode_image_and_text_cache(combo):
    backend, dtype = combo
    q, ks, vs = decode_inputs(dtype, beams=2, kv_heads=2, seed=7)
    lengths = [None, _int32(LENGTHS)]
    _skip_unless_runs(backend, q, ks, vs, lengths)
    out = mplug_kernels.concat_attention(q, ks, vs, key_lengths=lengths, backend=backend)
    scale = HEAD_DIM ** -0.5
    repeat = lambda xs: [x.repeat_interleave(2, 2) for x in xs]
    base, _ = low_precision_baseline(q, repeat(ks), repeat(vs), _length_masks(ks, lengths), scale)
    assert_within_budget(f"{backend} concat decode out", out, oracle(q, ks, vs, lengths, scale), base, 2.0)


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_decode_key_lengths_gradients(backend):
    q, ks, vs = decode_inputs(torch.float32, beams=2, kv_heads=2, seed=8, requires_grad=True)
    lengths = [_int32([3, 0, 30]), _int32(LENGTHS)]  # row 1 sees no image key, row 2's length is clamped to 11
    _skip_unless_runs(backend, q, ks, vs, lengths)
    seed = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    out = mplug_kernels.concat_attention(q, ks, vs, key_lengths=lengths, backend=backend)
    got = torch.autograd.grad((out * seed).sum(), [q, *ks, *vs])
    up = [x.detach().double().requires_grad_() for x in (q, *ks, *vs)]
    want_out = oracle(up[0], up[1:3], up[3:], lengths, HEAD_DIM ** -0.5)
    want = torch.autograd.grad((want_out * seed.double()).sum(), up)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    for name, g, w in zip(["q", "k0", "k1", "v0", "v1"], got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-4, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_key_lengths_combine_with_mask_and_clamp():
    q, (_, k), (_, v) = decode_inputs(torch.float32, beams=1, kv_heads=4, seed=10)
    mask = torch.ones(BATCH, CACHE, dtype=torch.bool, device=DEVICE)
    mask[0, 2] = False
    lengths = _int32([5, -3, 40])  # -3 keeps no key (zeros), 40 every key
    mask_before, lengths_before = mask.clone(), lengths.clone()
    out = mplug_kernels.co_attention(q, k, v, mask, key_lengths=lengths, backend="reference")
    explicit = mask & _length_masks([k], [lengths])[0]
    torch.testing.assert_close(out, mplug_kernels.co_attention(q, k, v, explicit, backend="reference"))
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(mask, mask_before) and torch.equal(lengths, lengths_before)


@pytest.mark.parametrize("lengths,error,match", [
    ([5, 5, 5], TypeError, "key_lengths must be an int32 torch.Tensor"),
    (torch.tensor([5, 5, 5]), TypeError, "key_lengths must have dtype torch.int32, got torch.int64"),
    (torch.tensor([5, 5], dtype=torch.int32), ValueError, r"key_lengths must have shape \[B\] = \(3,\)"),
    (torch.tensor([[5, 5, 5]], dtype=torch.int32), ValueError, r"key_lengths must have shape \[B\]"),
])
def test_co_attention_rejects_bad_key_lengths(lengths, error, match):
    q, (_, k), (_, v) = decode_inputs(torch.float32, beams=1, kv_heads=4, seed=11)
    if isinstance(lengths, torch.Tensor):
        lengths = lengths.to(DEVICE)
    with pytest.raises(error, match=match):
        mplug_kernels.co_attention(q, k, v, key_lengths=lengths, backend="reference")


def test_concat_attention_rejects_bad_key_lengths():
    q, ks, vs = decode_inputs(torch.float32, beams=1, kv_heads=4, seed=12)
    with pytest.raises(ValueError, match="key_lengths has 1 entries but there are 2 key sources"):
        mplug_kernels.concat_attention(q, ks, vs, key_lengths=[_int32(LENGTHS)])
    with pytest.raises(TypeError, match=r"key_lengths\[1\] must have dtype torch.int32"):
        mplug_kernels.concat_attention(q, ks, vs, key_lengths=[None, _int32(LENGTHS).float()])
    with pytest.raises(TypeError, match="key_lengths must be None or a tuple"):
        mplug_kernels.concat_attention(q, ks, vs, key_lengths=_int32(LENGTHS))


@pytest.mark.skipif(not ON_GPU, reason="host synchronisation is only observable on a CUDA device")
def test_decode_step_does_not_synchronise_the_host():
    q, ks, vs = decode_inputs(torch.float16, beams=2, kv_heads=2, seed=13)
    lengths = [None, _int32(LENGTHS)]
    mplug_kernels.concat_attention(q, ks, vs, key_lengths=lengths)  # warm-up: compilation and caches may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mplug_kernels.concat_attention(q, ks, vs, key_lengths=lengths)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a CUDA device")
def test_decode_step_replays_in_a_cuda_graph_with_new_lengths():
    q, ks, vs = decode_inputs(torch.float16, beams=2, kv_heads=2, seed=14)
    lengths = _int32(LENGTHS)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture
        mplug_kernels.concat_attention(q, ks, vs, key_lengths=[None, lengths])
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mplug_kernels.concat_attention(q, ks, vs, key_lengths=[None, lengths])
    lengths.copy_(_int32([CACHE, 2, 0]))  # the next step's lengths, written into the captured buffer
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, mplug_kernels.concat_attention(q, ks, vs, key_lengths=[None, lengths]))
