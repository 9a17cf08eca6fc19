"""CoAttentionStack: hoisted vision K/V (one wide GEMM, cached) match per-layer projections, values and grads."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mplug_kernels.nn import CoAttention, CoAttentionStack
from attention_testing import DEVICE, KERNEL_BACKENDS, make_mask, random_tensor, skip_unless_supported

BATCH, HIDDEN, HEADS, KV_WIDTH, NUM_LAYERS = 2, 64, 4, 48, 3


def _layers(dtype, backend="reference", kv_strategy="project", seed=0):
    torch.manual_seed(seed)
    layers = [CoAttention(HIDDEN, HEADS, KV_WIDTH, backend=backend, kv_strategy=kv_strategy) for _ in range(NUM_LAYERS)]
    return [layer.to(device=DEVICE, dtype=dtype) for layer in layers]


def _inputs(dtype, vision_len=25, text_len=7, seed=1):
    generator = torch.Generator().manual_seed(seed)
    vision = random_tensor(BATCH, vision_len, KV_WIDTH, dtype=dtype, generator=generator, requires_grad=True)
    text = random_tensor(BATCH, text_len, HIDDEN, dtype=dtype, generator=generator, requires_grad=True)
    return vision, text, make_mask("one_row_fully_masked", BATCH, vision_len, generator)


def _run_layers(layers, text, memory, mask, cache=None):
    for index, layer in enumerate(layers):
        if cache is None:
            text = layer(text, memory, mask)
        else:
            text = layer(text, encoder_attention_mask=mask, vision_kv=cache[index])
    return text


def _outputs_and_grads(layers, vision, text, mask, hoisted):
    cache = CoAttentionStack(layers).vision_kv(vision) if hoisted else None
    out = _run_layers(layers, text, vision, mask, cache)
    params = [p for layer in layers for p in layer.parameters()]
    seed = torch.linspace(-1, 1, out.numel(), dtype=out.dtype, device=out.device).view_as(out)
    return [out, *torch.autograd.grad((out * seed).sum(), [vision, text, *params], allow_unused=True)]


@pytest.mark.parametrize(
    "backend,dtype,atol",
    [("reference", torch.float64, 1e-12), ("reference", torch.float32, 2e-5)] + [(b, torch.float32, 2e-5) for b in KERNEL_BACKENDS],
)
def test_hoisted_matches_per_layer_projection(backend, dtype, atol):
    layers = _layers(dtype, backend)
    vision, text, mask = _inputs(dtype)
    q = text.unflatten(-1, (HEADS, -1))
    skip_unless_supported(backend, q, [q], [q], [mask], return_lse=False)
    hoisted = _outputs_and_grads(layers, vision, text, mask, hoisted=True)
    per_layer = _outputs_and_grads(layers, vision, text, mask, hoisted=False)
    for got, want in zip(hoisted, per_layer):
        torch.testing.assert_close(got, want, rtol=atol, atol=atol)


class _RecordMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm"):
            self.shapes.append(tuple(out.shape))
        return out


def test_one_wide_gemm_for_the_stack_reused_across_questions():
    layers = _layers(torch.float32)
    vision, text, mask = _inputs(torch.float32, vision_len=25, text_len=7)
    other_text = text.detach().flip(1)
    calls = []
    for layer in layers:
        for linear in (layer.self.key, layer.self.value):
            linear.register_forward_hook(lambda *args: calls.append(1))
    cache = CoAttentionStack(layers).vision_kv(vision)
    assert not cache.projected
    with torch.no_grad(), _RecordMatmuls() as recorded:
        _run_layers(layers, text, None, mask, cache)
        _run_layers(layers, other_text, None, mask, cache)
    vision_gemms = [shape for shape in recorded.shapes if shape[0] == BATCH * 25]
    assert cache.projected and not calls
    assert vision_gemms == [(BATCH * 25, NUM_LAYERS * 2 * HIDDEN)]


def test_decoder_memory_of_two_sources():
    layers = _layers(torch.float64)
    vision, text, mask = _inputs(torch.float64)
    generator = torch.Generator().manual_seed(2)
    memory_text = random_tensor(BATCH, 7, KV_WIDTH, dtype=torch.float64, generator=generator)
    masks = (mask, make_mask("padding", BATCH, 7, generator))
    queries = text[:, :3]
    cache = CoAttentionStack(layers).vision_kv(vision, memory_text)
    hoisted = _run_layers(layers, queries, None, masks, cache)
    direct = _run_layers(layers, queries, (vision, memory_text), masks)
    torch.testing.assert_close(hoisted, direct, rtol=1e-12, atol=1e-12)


def test_absorbing_layers_never_project():
    layers = _layers(torch.float64, kv_strategy="absorb")
    vision, text, mask = _inputs(torch.float64)
    cache = CoAttentionStack(layers).vision_kv(vision)
    _run_layers(layers, text, None, mask, cache)
    assert not cache.projected
    assert cache.project().projected and cache[-1].projected


def test_parameters_stay_with_the_layers():
    layers = torch.nn.ModuleList(_layers(torch.float32))
    before = set(layers.state_dict())
    stack = CoAttentionStack(layers)
    assert set(layers.state_dict()) == before and stack.layers[0] is layers[0] and len(stack) == NUM_LAYERS


@pytest.mark.parametrize(
    "make_stack,error,message",
    [
        (lambda: CoAttentionStack([]), ValueError, "at least one"),
        (lambda: CoAttentionStack([torch.nn.Linear(2, 2)]), TypeError, r"layers\[0\] must be a CoAttention"),
        (lambda: CoAttentionStack([CoAttention(64, 4, 48), CoAttention(64, 8, 48)]), ValueError, r"layers\[1\]"),
        (lambda: CoAttentionStack([CoAttention(64, 4, 48)]).vision_kv(torch.zeros(2, 5, 64)), ValueError, r"features\[0\]"),
        (lambda: CoAttentionStack([CoAttention(64, 4, 48)]).vision_kv(), ValueError, "at least one memory source"),
        (lambda: CoAttentionStack([CoAttention(64, 4, 48)]).vision_kv(torch.zeros(2, 5, 48))[1], IndexError, "out of range"),
    ],
)
def test_bad_input_raises_clear_error(make_stack, error, message):
    with pytest.raises(error, match=message):
        make_stack()
