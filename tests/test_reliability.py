"""The defects adversarial probing found (issue 16), each pinned by its reproducer: masked NaN, float 0/1 masks, empty
batches, merged empty parts; and in the model: poisoned ITC queues, NaN retrieval scores, checkpoint loading that
fails half way, all-padding texts, generation past the position limit, unclear argument errors."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from mplug import MPLUG, MPLUGConfig, load_official_checkpoint
from mplug_kernels.nn.co_attention import CoAttention
from attention_testing import skip_unless_supported

ATTENTION_BACKENDS = ["reference", "sdpa", "triton", "cuda"]
CLS, SEP, PAD = 101, 102, 0


def _attention_inputs(dtype, requires_grad=False, batch=2, q_len=3, k_len=6, heads=2, head_dim=32):
    generator = torch.Generator().manual_seed(0)
    make = lambda length: torch.randn(batch, length, heads, head_dim, generator=generator).to(dtype).requires_grad_(requires_grad)
    mask = torch.ones(batch, k_len, dtype=torch.bool)
    mask[:, -2:] = False
    return make(q_len), make(k_len), make(k_len), mask


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("planted", ["key", "value"])
def test_nan_in_a_masked_key_or_value_changes_nothing(backend, planted):
    """Issue 16 item 11: sdpa returned NaN for a masked NaN key; a masked NaN value made the (batch, head) NaN everywhere."""
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True)
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    clean = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    dirty_k, dirty_v = k.detach().clone(), v.detach().clone()
    (dirty_k if planted == "key" else dirty_v)[:, -1] = float("nan")
    dirty_k.requires_grad_(), dirty_v.requires_grad_()
    dirty = mplug_kernels.co_attention(q, dirty_k, dirty_v, mask, backend=backend)
    assert torch.equal(dirty, clean)
    seed = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)).to(clean.dtype)
    clean_grads = torch.autograd.grad((clean * seed).sum(), [q, k, v])
    dirty_grads = torch.autograd.grad((dirty * seed).sum(), [q, dirty_k, dirty_v])
    for name, dirty_grad, clean_grad in zip(("dq", "dk", "dv"), dirty_grads, clean_grads):
        assert torch.equal(dirty_grad, clean_grad), f"{name} changed by a NaN in a masked {planted}"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_nan_query_of_a_fully_masked_row_gives_zeros(backend):
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True)
    mask[0] = False
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    dirty_q = q.detach().clone()
    dirty_q[0] = float("nan")
    dirty_q.requires_grad_()
    out = mplug_kernels.co_attention(dirty_q, k, v, mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and not out[1].isnan().any()
    grads = torch.autograd.grad(out.float().sum(), [dirty_q, k, v])
    assert all(not g.isnan().any() for g in grads) and torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_empty_batch_gives_empty_outputs_and_gradients(backend):
    """Issue 16 item 3: B = 0 raised ZeroDivisionError (triton) and "needs a delta workspace" (cuda backward)."""
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True, batch=0)
    return_lse = backend != "sdpa"
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=return_lse)
    result = mplug_kernels.co_attention(q, k, v, mask, return_lse=return_lse, backend=backend)
    out = result[0] if return_lse else result
    assert out.shape == q.shape
    if return_lse:
        assert result[1].shape == (0, q.shape[2], q.shape[1])
    grads = torch.autograd.grad(out.float().sum(), [q, k, v])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_merge_ignores_the_out_of_a_part_without_keys():
    """A part with lse = -inf holds no key: whatever its out holds (NaN here) neither reaches the result nor its gradients."""
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 2, 8, generator=generator, requires_grad=True)
    full_lse = torch.randn(2, 2, 3, generator=generator, requires_grad=True)
    empty = torch.full((2, 3, 2, 8), float("nan"), requires_grad=True)
    empty_lse = torch.full((2, 2, 3), float("-inf"))
    out, lse = mplug_kernels.merge_attention_states((full, empty), (full_lse, empty_lse))
    assert torch.equal(out, full) and torch.equal(lse, full_lse)
    grads = torch.autograd.grad(out.sum() + lse.sum(), [full, full_lse, empty])
    assert all(not g.isnan().any() for g in grads)


def _co_attention_layer():
    torch.manual_seed(0)
    return CoAttention(32, 2, backend="reference").eval()


def test_float_zero_one_mask_is_refused_as_ambiguous():
    """Issue 16 item 2: a float 0/1 mask was read as additive, so padding was attended (output off by 0.24)."""
    layer = _co_attention_layer()
    text, vision = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"additive.*0 = attend.*bool"):
        layer(text, vision, keep)
    expected = layer(text, vision, keep.bool())
    additive = (1.0 - keep) * -10000.0
    assert torch.allclose(layer(text, vision, additive), expected)
    assert torch.allclose(layer(text, vision, torch.zeros(2, 5).masked_fill(keep == 0, float("-inf"))), expected)
    assert torch.allclose(layer(text, vision, torch.zeros(2, 5)), layer(text, vision, None))
