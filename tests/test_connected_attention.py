"""ConnectedAttention against a straightforward torch.cat implementation of the layer, forward and backward."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mplug_kernels.nn import ConnectedAttention
from mplug_kernels.nn.connected_attention import concatenated_connected_attention
from attention_testing import (
    DEVICE,
    KERNEL_BACKENDS,
    ON_GPU,
    TEST_DTYPES,
    assert_within_budget,
    make_mask,
    random_tensor,
    skip_unless_supported,
    widest_dtype,
)

BATCH, HIDDEN, HEADS, FFN = 2, 64, 2, 128
LENGTHS = [(1, 1), (25, 7), (257, 25), (577, 25)] if ON_GPU else [(1, 1), (25, 7), (257, 25)]
MASK_KINDS = ["none", "bool", "additive", "text_row_fully_masked"]


def _layer(dtype, seed=0, backend="auto"):
    torch.manual_seed(seed)
    layer = ConnectedAttention(HIDDEN, HEADS, FFN, backend=backend)
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return layer.to(device=DEVICE, dtype=dtype)


def _masks(kind, vision_len, text_len, generator):
    if kind == "none":
        return None, None
    vision = make_mask("padding", BATCH, vision_len, generator)
    text = make_mask("padding", BATCH, text_len, generator)
    if kind == "text_row_fully_masked":
        text[0] = False
    if kind == "additive":
        to_additive = lambda keep: ((~keep).float() * -10000.0)[:, None, None, :]
        return to_additive(vision), to_additive(text)
    return vision, text


def _inputs(vision_len, text_len, dtype, mask_kind, seed):
    generator = torch.Generator().manual_seed(seed)
    vision = random_tensor(BATCH, vision_len, HIDDEN, dtype=dtype, generator=generator, requires_grad=True)
    text = random_tensor(BATCH, text_len, HIDDEN, dtype=dtype, generator=generator, requires_grad=True)
    return vision, text, *_masks(mask_kind, vision_len, text_len, generator)


def _run(layer, function, vision, text, vision_mask, text_mask, seeds):
    """Outputs and the gradients of sum(out * seed) w.r.t. vision, text and every parameter."""
    vision = vision.detach().to(next(layer.parameters()).dtype).requires_grad_()
    text = text.detach().to(vision.dtype).requires_grad_()
    outs = function(layer, vision, text, vision_mask, text_mask)
    loss = sum((out.double() * seed).sum() for out, seed in zip(outs, seeds))
    inputs = [vision, text, *layer.parameters()]
    return list(outs) + list(torch.autograd.grad(loss, inputs))


def _check_layer(backend, dtype, vision, text, vision_mask, text_mask):
    layer = _layer(dtype, backend=backend)
    skip_unless_supported(backend, text.unflatten(-1, (HEADS, -1)), [text.unflatten(-1, (HEADS, -1))] * 2,
                          [text.unflatten(-1, (HEADS, -1))] * 2, [None, None], return_lse=False)
    generator = torch.Generator().manual_seed(7)
    seeds = [random_tensor(*x.shape, dtype=torch.float64, generator=generator) for x in (vision, text)]
    ours = _run(layer, lambda m, *a: m(*a), vision, text, vision_mask, text_mask, seeds)
    reference = lambda m, *a: concatenated_connected_attention(m, *a, backend="reference")
    expected = _run(copy.deepcopy(layer).double(), reference, vision, text, vision_mask, text_mask, seeds)
    baseline = _run(layer, concatenated_connected_attention, vision, text, vision_mask, text_mask, seeds)
    names = ["vision_out", "text_out", "d_vision", "d_text"] + [f"d_{n}" for n, _ in layer.named_parameters()]
    for name, got, want, base in zip(names, ours, expected, baseline):
        assert got.dtype == dtype and got.shape == want.shape
        factor = 2 if name.endswith("_out") else 3
        assert_within_budget(name, got, want, base, factor=factor, slack=1e-4 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["sdpa", "reference"])
@pytest.mark.parametrize("vision_len,text_len", LENGTHS)
@pytest.mark.parametrize("dtype", TEST_DTYPES)
def test_matches_cat_implementation(backend, dtype, vision_len, text_len):
    if backend == "reference" and dtype != torch.float32:
        pytest.skip("the reference backend is checked in float32")
    _check_layer(backend, dtype, *_inputs(vision_len, text_len, dtype, "bool", seed=vision_len + text_len))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["reference"])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
def test_mask_kinds(backend, mask_kind):
    dtype = widest_dtype(backend)
    _check_layer(backend, dtype, *_inputs(25, 7, dtype, mask_kind, seed=3))


def test_non_contiguous_inputs():
    generator = torch.Generator().manual_seed(5)
    vision = random_tensor(BATCH, 25, 2 * HIDDEN, dtype=torch.float32, generator=generator)[..., ::2]
    text = random_tensor(7, BATCH, HIDDEN, dtype=torch.float32, generator=generator).transpose(0, 1)
    assert not (vision.is_contiguous() or text.is_contiguous())
    _check_layer("reference", torch.float32, vision, text, None, None)
    layer = _layer(torch.float32)
    for got, want in zip(layer(vision, text), layer(vision.contiguous(), text.contiguous())):
        torch.testing.assert_close(got, want)


def test_bert_submodule_names():
    names = {name for name, _ in _layer(torch.float32).named_parameters()}
    expected = {
        f"{module}.{kind}"
        for module in ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                       "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm"]
        for kind in (["weight", "bias"])
    }
    assert names == expected


class _RecordOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_no_concatenation_on_the_path(backend):
    dtype = widest_dtype(backend)
    vision, text, vision_mask, text_mask = _inputs(25, 7, dtype, "bool", seed=6)
    layer = _layer(dtype, backend=backend)
    skip_unless_supported(backend, text.unflatten(-1, (HEADS, -1)), [text.unflatten(-1, (HEADS, -1))],
                          [text.unflatten(-1, (HEADS, -1))], [None], return_lse=False)
    with _RecordOps() as recorded:
        vision_out, text_out = layer(vision, text, vision_mask, text_mask)
        torch.autograd.grad((vision_out.sum(), text_out.sum()), (vision, text))
    assert "mm" in recorded.ops or "addmm" in recorded.ops
    assert not {"cat", "stack"} & recorded.ops


def test_bad_masks_raise_clear_errors():
    vision, text, _, _ = _inputs(25, 7, torch.float32, "none", seed=8)
    layer = _layer(torch.float32)
    with pytest.raises(ValueError, match=r"\(2, 7\)"):
        layer(vision, text, None, torch.ones(BATCH, 25, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="bool"):
        layer(vision, text, torch.ones(BATCH, 25, dtype=torch.int64, device=DEVICE))
