"""co_attention on every kernel backend against a float64 reference (flash-attn's error rule)."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from mplug_kernels import reference
from mplug_kernels.backends.kernel_inputs import force_num_splits
from mplug_kernels.occupancy import split_plan
from mplug_kernels.ops import triton_launch
from attention_testing import (
    DEVICE,
    KERNEL_BACKENDS,
    LOW_PRECISION_DTYPES,
    MASK_KINDS,
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

SEQ_LENS = [(1, 1), (1, 577), (7, 197), (25, 257), (25, 577), (33, 1025), (64, 257), (80, 901)]
# The CPU interpreter is slow: the long shapes run their full grid only on a GPU.
CPU_SEQ_LENS = [(1, 1), (1, 577), (7, 197), (25, 257), (33, 1025)]
GRID_SEQ_LENS = SEQ_LENS if ON_GPU else CPU_SEQ_LENS
HEAD_DIMS = [32, 40, 64, 80, 96, 128]
BATCH, HEADS = 2, 2


@pytest.fixture(autouse=True)
def _restore_split_heuristic():
    yield
    force_num_splits(None)


def _finite(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


def _inputs(q_len, k_len, head_dim, dtype, mask_kind, seed, requires_grad=False):
    generator = torch.Generator().manual_seed(seed)
    q = random_tensor(BATCH, q_len, HEADS, head_dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    k = random_tensor(BATCH, k_len, HEADS, head_dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    v = random_tensor(BATCH, k_len, HEADS, head_dim, dtype=dtype, generator=generator, requires_grad=requires_grad)
    return q, k, v, make_mask(mask_kind, BATCH, k_len, generator)


def _check_forward(backend, q, k, v, mask):
    skip_unless_supported(backend, q, [k], [v], [mask])
    scale = q.shape[-1] ** -0.5
    out, lse = mplug_kernels.co_attention(q, k, v, mask, return_lse=True, backend=backend)
    _, _, _, out_ref, lse_ref = reference64(q, [k], [v], [mask], scale)
    out_base, lse_base = low_precision_baseline(q, [k], [v], [mask], scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert lse.dtype == torch.float32 and lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    assert_within_budget("out", out, out_ref, out_base, factor=2)
    assert_within_budget("lse", lse, lse_ref, lse_base, factor=2, slack=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("q_len,k_len", GRID_SEQ_LENS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_forward_matches_reference(backend, dtype, q_len, k_len, mask_kind):
    _check_forward(backend, *_inputs(q_len, k_len, 64, dtype, mask_kind, seed=q_len * 7919 + k_len))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_forward_head_dims(backend, dtype, head_dim):
    _check_forward(backend, *_inputs(7, 197, head_dim, dtype, "padding", seed=head_dim))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("num_splits", [1, 3, 10])  # 10: split_keys(577, 10) = 9 splits, the last one 65 keys
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_split_kv_forced(backend, num_splits, mask_kind):
    force_num_splits(num_splits)
    _check_forward(backend, *_inputs(25, 577, 64, LOW_PRECISION_DTYPES[0], mask_kind, seed=num_splits))


def test_triton_split_plan_is_occupancys():
    """The Triton forward's split is occupancy.split_plan's (the interpreter's 4 SMs x 2 CTAs on the CPU):
    B = 2, H = 2, Lq = 25 is 4 CTAs unsplit, a wave is 8, so Lk = 577 runs as 2 splits of 320 keys."""
    q, k, v, mask = _inputs(25, 577, 64, torch.float16, "padding", seed=0)
    out, lse = torch.empty_like(q), torch.empty(BATCH, HEADS, 25)
    unsplit = triton_launch.forward_launches(q, [k], [v], [mask], 0.125, out, lse, (1, 640))[0]
    plan = triton_launch.choose_split_plan(unsplit, 577)
    assert plan == split_plan(BATCH, HEADS, 25, 577, 64, 2, backend="triton", sm_count=4, ctas_per_sm=2) == (2, 320)
    forward, combine = triton_launch.forward_launches(q, [k], [v], [mask], 0.125, out, lse, plan)
    assert forward.grid == (1, BATCH * HEADS, 2) and combine.grid == (BATCH * HEADS * 25,)


def _check_backward(backend, q, k, v, mask):
    skip_unless_supported(backend, q, [k], [v], [mask])
    scale = q.shape[-1] ** -0.5
    generator = torch.Generator().manual_seed(1)
    dout = random_tensor(*q.shape, dtype=q.dtype, generator=generator)
    dlse = random_tensor(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float32, generator=generator)
    out, lse = mplug_kernels.co_attention(q, k, v, mask, return_lse=True, backend=backend)
    ours = grads([out, _finite(lse)], [q, k, v], [dout, dlse])
    q64, ks64, vs64, out_ref, lse_ref = reference64(q, [k], [v], [mask], scale)
    expected = grads([out_ref, _finite(lse_ref)], [q64, *ks64, *vs64], [dout, dlse])
    out_base, lse_base = low_precision_baseline(q, [k], [v], [mask], scale)
    baseline = grads([out_base, _finite(lse_base)], [q, k, v], [dout, dlse])
    for name, g, g_ref, g_base in zip(("dq", "dk", "dv"), ours, expected, baseline):
        assert g.dtype == q.dtype
        assert_within_budget(name, g, g_ref, g_base, factor=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("q_len,k_len", GRID_SEQ_LENS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_backward_matches_reference(backend, dtype, q_len, k_len, mask_kind):
    _check_backward(backend, *_inputs(q_len, k_len, 64, dtype, mask_kind, seed=q_len + k_len, requires_grad=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("head_dim", [40, 80, 128])
def test_backward_head_dims(backend, head_dim):
    _check_backward(backend, *_inputs(7, 197, head_dim, LOW_PRECISION_DTYPES[0], "padding", seed=3, requires_grad=True))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("dtype", ["widest", torch.bfloat16])
def test_deterministic_backward_is_bitwise_repeatable(backend, dtype):
    dtype = widest_dtype(backend) if dtype == "widest" else dtype
    q, k, v, mask = _inputs(25, 257, 64, dtype, "padding", seed=5, requires_grad=True)
    skip_unless_supported(backend, q, [k], [v], [mask])
    dout = torch.randn_like(q)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
            runs.append(torch.autograd.grad(out, (q, k, v), dout))
    finally:
        torch.use_deterministic_algorithms(False)
    for first, second in zip(*runs):
        assert torch.equal(first, second)
    _check_backward(backend, q, k, v, mask)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
def test_non_contiguous_inputs(backend):
    generator = torch.Generator().manual_seed(11)
    dtype = LOW_PRECISION_DTYPES[0] if backend != "reference" else torch.float32
    # q sliced from a wider head axis, k and v as strided views of one packed KV tensor, mask a column slice.
    q = random_tensor(BATCH, 25, 2 * HEADS, 64, dtype=dtype, generator=generator)[:, :, ::2]
    kv = random_tensor(BATCH, 197, 2, HEADS, 64, dtype=dtype, generator=generator)
    k, v = kv[:, :, 0], kv[:, :, 1]
    mask = make_mask("padding", BATCH, 394, generator)[:, ::2]
    assert not (q.is_contiguous() or k.is_contiguous() or mask.is_contiguous())
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    expected = mplug_kernels.co_attention(q.contiguous(), k.contiguous(), v.contiguous(), mask.contiguous(), backend="reference")
    _, _, _, out_ref, _ = reference64(q, [k], [v], [mask], 64 ** -0.5)
    base, _ = low_precision_baseline(q, [k], [v], [mask], 64 ** -0.5)
    assert_within_budget("out", out, out_ref, base, factor=2)
    assert_within_budget("contiguous reference", expected, out_ref, base, factor=2)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
def test_fully_masked_batch_gives_zeros_not_nan(backend):
    q, k, v, mask = _inputs(7, 197, 64, widest_dtype(backend), "one_row_fully_masked", seed=2, requires_grad=True)
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for g in (dq, dk, dv):
        assert torch.isfinite(g).all()
    assert torch.equal(dq[0], torch.zeros_like(dq[0])) and torch.equal(dv[0], torch.zeros_like(dv[0]))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
def test_inputs_are_not_modified(backend):
    q, k, v, mask = _inputs(7, 197, 64, widest_dtype(backend), "padding", seed=4, requires_grad=True)
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    before = [t.detach().clone() for t in (q, k, v, mask)]
    out = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for original, tensor in zip(before, (q, k, v, mask)):
        assert torch.equal(original, tensor.detach())


@pytest.mark.parametrize("softmax_scale", [None, 0.05, 1.0])
def test_softmax_scale_is_honoured(softmax_scale):
    q, k, v, mask = _inputs(7, 197, 32, torch.float32, "padding", seed=9)
    out = mplug_kernels.co_attention(q, k, v, mask, softmax_scale=softmax_scale, backend="reference")
    scale = softmax_scale if softmax_scale is not None else 32 ** -0.5
    scores = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) * scale
    probs = torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", probs, v.double())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_reference_backward_matches_autograd():
    q, k, v, mask = _inputs(7, 33, 32, torch.float64, "one_row_fully_masked", seed=6, requires_grad=True)
    out, lse = reference.attention_forward(q, [k], [v], [mask], 0.2)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse)
    expected = torch.autograd.grad((out * dout).sum() + (_finite(lse) * dlse).sum(), (q, k, v))
    dq, dks, dvs = reference.attention_backward(dout, dlse, q, [k], [v], [mask], out, lse, 0.2)
    for g, g_ref in zip((dq, dks[0], dvs[0]), expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck():
    q, k, v, mask = _inputs(3, 5, 8, torch.float64, "padding", seed=8, requires_grad=True)
    fn = lambda q, k, v: mplug_kernels.co_attention(q, k, v, mask, return_lse=True, backend="reference")
    assert torch.autograd.gradcheck(lambda *x: tuple(_finite(t) for t in fn(*x)), (q, k, v))


@pytest.mark.skipif(not ON_GPU, reason="Triton autotunes only on a GPU")
@pytest.mark.parametrize("config", range(len(triton_launch.FORWARD_CONFIGS)))
def test_every_triton_forward_config_matches_reference(monkeypatch, config):
    """Each autotuning candidate, run on its own (test runs may switch tuning off), over 3 splits."""
    meta = triton_launch.config_meta(triton_launch.FORWARD_CONFIGS[config])
    monkeypatch.setattr(triton_launch, "_forward_launcher", lambda: (triton_launch._forward_kernel, meta))
    force_num_splits(3)
    _check_forward("triton", *_inputs(25, 577, 64, torch.bfloat16, "padding", seed=config))


@pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_long_keys_on_gpu(backend):
    _check_forward(backend, *_inputs(25, 16384, 64, torch.bfloat16, "padding", seed=12))
