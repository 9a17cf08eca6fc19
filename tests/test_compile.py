"""torch.compile(fullgraph=True) traces through the registered custom op (reference backend, on the CPU)."""
from __future__ import annotations

import torch

import mplug_kernels
from attention_testing import make_mask, random_tensor


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
    torch.library.opcheck(torch.ops.mplug_kernels.attention_forward.default, (q, [k], [v], [mask], 1, 0.25, "reference"))
