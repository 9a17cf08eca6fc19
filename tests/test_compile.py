"""torch.compile(fullgraph=True) traces through the registered custom op (reference backend, on the CPU)."""
from __future__ import annotations

import torch

import mplug_kernels
from attention_testing import DEVICE, make_mask, random_tensor


def test_compile_fullgraph_forward_and_backward():
    generator = torch.Generator().manual_seed(0)
    q = random_tensor(2, 7, 2, 32, dtype=torch.float32, generator=generator, requires_grad=True)
    k = random_tensor(2, 33, 2, 32, dtype=torch.float32, generator=generator, requires_grad=True)
    v = random_tensor(2, 33, 2, 32, dtype=torch.float32, generator=generator, requires_grad=True)
    mask = make_mask("padding", 2, 33, generator)

    def loss_fn(q, k, v, mask):
        out, lse = mplug_kernels.co_attention(q, k, v, mask, return_lse=True, backend="reference")
        return (out * out).sum() + lse.sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    eager_loss = loss_fn(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled_loss = compiled(q, k, v, mask)
    compiled_grads = torch.autograd.grad(compiled_loss, (q, k, v))
    torch.testing.assert_close(compiled_loss, eager_loss)
    for g, g_ref in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(g, g_ref)


def test_custom_op_passes_opcheck():
    generator = torch.Generator().manual_seed(1)
    q = random_tensor(1, 3, 2, 16, dtype=torch.float32, generator=generator, requires_grad=True)
    k = random_tensor(1, 5, 2, 16, dtype=torch.float32, generator=generator, requires_grad=True)
    v = random_tensor(1, 5, 2, 16, dtype=torch.float32, generator=generator, requires_grad=True)
    mask = make_mask("padding", 1, 5, generator)
    op = torch.ops.mplug_kernels.attention_forward.default
    torch.library.opcheck(op, (q, [k], [v], [mask], 1, [], 0, None, 0.25, "reference"))
    key_positions = torch.tensor([[0, 0, 1, 2, 3]], dtype=torch.int32)
    query_positions = torch.tensor([[1, 2, 3]], dtype=torch.int32)
    torch.library.opcheck(op, (q, [k], [v], [mask], 1, [key_positions], 1, query_positions, 0.25, "reference"))


def _fullgraph_matches_eager(fn, *args):
    """fn compiled with fullgraph=True (default inductor backend) gives eager's answer."""
    torch._dynamo.reset()
    torch.testing.assert_close(torch.compile(fn, fullgraph=True)(*args), fn(*args), atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_default_auto_co_attention():
    generator = torch.Generator().manual_seed(2)
    q = random_tensor(1, 3, 2, 16, dtype=torch.float32, generator=generator)
    k = random_tensor(1, 5, 2, 16, dtype=torch.float32, generator=generator)
    v = random_tensor(1, 5, 2, 16, dtype=torch.float32, generator=generator)
    _fullgraph_matches_eager(lambda q, k, v, mask: mplug_kernels.co_attention(q, k, v, mask), q, k, v,
                             make_mask("padding", 1, 5, generator))


def test_compile_fullgraph_default_auto_concat_attention_with_positions():
    generator = torch.Generator().manual_seed(4)
    q = random_tensor(1, 3, 2, 16, dtype=torch.float32, generator=generator)
    ks = [random_tensor(1, n, 2, 16, dtype=torch.float32, generator=generator) for n in (4, 3)]
    vs = [random_tensor(1, n, 2, 16, dtype=torch.float32, generator=generator) for n in (4, 3)]
    text_positions = torch.arange(3, dtype=torch.int32)[None]
    image_positions = torch.full((1, 4), 1, dtype=torch.int32)
    _fullgraph_matches_eager(
        lambda q, k0, k1, v0, v1: mplug_kernels.concat_attention(
            q, [k0, k1], [v0, v1], key_positions=[image_positions, text_positions], query_positions=text_positions),
        q, *ks, *vs)


def test_compile_fullgraph_default_auto_concat_attention():
    generator = torch.Generator().manual_seed(3)
    q = random_tensor(1, 3, 2, 16, dtype=torch.float32, generator=generator)
    ks = [random_tensor(1, n, 2, 16, dtype=torch.float32, generator=generator) for n in (4, 2)]
    vs = [random_tensor(1, n, 2, 16, dtype=torch.float32, generator=generator) for n in (4, 2)]
    _fullgraph_matches_eager(lambda q, k0, k1, v0, v1: mplug_kernels.concat_attention(q, [k0, k1], [v0, v1]),
                             q, *ks, *vs)


def test_compile_fullgraph_default_auto_decode_loop():
    generator = torch.Generator().manual_seed(4)
    image_k = random_tensor(1, 4, 2, 16, dtype=torch.float32, generator=generator)
    image_v = random_tensor(1, 4, 2, 16, dtype=torch.float32, generator=generator)
    first = random_tensor(1, 1, 2, 16, dtype=torch.float32, generator=generator)

    def decode(x, image_k, image_v):
        text_k, text_v, steps = x, x, []
        for _ in range(3):  # each step attends to the image and the text so far, then extends the text cache
            x = mplug_kernels.concat_attention(x, [image_k, text_k], [image_v, text_v])
            text_k, text_v = torch.cat([text_k, x], 1), torch.cat([text_v, x], 1)
            steps.append(x)
        return torch.cat(steps, 1)

    _fullgraph_matches_eager(decode, first, image_k, image_v)


def _decode_with_cache(x, image_k, image_v, k_cache, v_cache, lengths):
    """4 decode steps: each writes x at row b's position lengths[b] of the preallocated caches (out of place), then
    attends to the image and the first lengths[b] + 1 cache entries (key_lengths, no host read)."""
    rows, steps = torch.arange(x.shape[0], device=x.device), []
    for _ in range(4):
        k_cache = k_cache.index_put((rows, lengths.long()), x[:, 0])
        v_cache = v_cache.index_put((rows, lengths.long()), x[:, 0])
        lengths = lengths + 1
        x = mplug_kernels.concat_attention(x, [image_k, k_cache], [image_v, v_cache], key_lengths=[None, lengths])
        steps.append(x)
    return torch.cat(steps, 1), lengths


def test_compile_fullgraph_auto_decode_with_per_row_cache_lengths():
    generator = torch.Generator().manual_seed(5)
    make = lambda length: random_tensor(3, length, 2, 16, dtype=torch.float32, generator=generator)
    x, image_k, image_v, k_cache, v_cache = make(1), make(4), make(4), make(9), make(9)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(_decode_with_cache)(x, image_k, image_v, k_cache, v_cache,
                                                          torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE))
    assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
    compiled = torch.compile(_decode_with_cache, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):  # the lengths' values are data, not baked in
        for lengths in ([0, 2, 5], [4, 0, 1]):
            lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
            got, want = compiled(x, image_k, image_v, k_cache, v_cache, lengths), _decode_with_cache(
                x, image_k, image_v, k_cache, v_cache, lengths)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_compile_fullgraph_auto_resolves_baseline_availability_inside_the_trace(monkeypatch):
    """From a cold cache, flash_attn/xformers availability (importlib) is first resolved while dynamo traces."""
    from mplug_kernels.backends import BACKENDS, baselines

    baselines._import_reason.cache_clear()
    for backend in BACKENDS.values():
        monkeypatch.delitem(backend.__dict__, "_resolved_unavailable_reason", raising=False)
    generator = torch.Generator().manual_seed(6)
    q, k, v = (random_tensor(2, n, 2, 16, dtype=torch.float32, generator=generator) for n in (1, 6, 6))
    lengths = torch.tensor([3, 6], dtype=torch.int32, device=DEVICE)
    _fullgraph_matches_eager(lambda q, k, v, lengths: mplug_kernels.co_attention(q, k, v, key_lengths=lengths),
                             q, k, v, lengths)
    assert "_resolved_unavailable_reason" in BACKENDS["flash_attn"].__dict__
