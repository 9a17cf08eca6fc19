"""Shared test helpers: random inputs, masks, a float64 reference and PyTorch's own low-precision baseline."""
from __future__ import annotations

from typing import List, Optional, Sequence

import pytest
import torch

from mplug_kernels import reference
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.sdpa import masked_sources, zero_dead_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE.type == "cuda"
# bfloat16 runs everywhere except on the Triton CPU interpreter, whose backend declares it cannot.
LOW_PRECISION_DTYPES = [torch.float16, torch.bfloat16]
TEST_DTYPES = [torch.float32] + LOW_PRECISION_DTYPES
KERNEL_BACKENDS = ["triton", "cuda"]
MASK_KINDS = ["none", "padding", "one_row_fully_masked"]


def random_tensor(*shape, dtype, generator, requires_grad=False) -> torch.Tensor:
    """Fresh N(0, 1) values in dtype on the test device."""
    x = torch.randn(*shape, generator=generator, dtype=torch.float32).to(device=DEVICE, dtype=dtype)
    return x.requires_grad_(requires_grad)


def make_mask(kind: str, batch: int, length: int, generator) -> Optional[torch.Tensor]:
    """None, random key padding (>= 1 key kept per row), or padding with batch element 0 fully masked."""
    if kind == "none":
        return None
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    if kind == "one_row_fully_masked":
        mask[0] = False
    return mask.to(DEVICE)


def reference64(q, ks, vs, masks, scale):
    """(out, lse) in float64 from the reference math."""
    up = lambda xs: [x.detach().double().requires_grad_(x.requires_grad) for x in xs]
    q64, ks64, vs64 = up([q])[0], up(ks), up(vs)
    out, lse = reference.attention_forward(q64, ks64, vs64, masks, scale)
    return q64, ks64, vs64, out, lse


def low_precision_baseline(q, ks, vs, masks, scale):
    """PyTorch's own attention math run in q's dtype (no upcast): the error budget for our kernels."""
    k, v, keep, alive = masked_sources(ks, vs, masks)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    out = zero_dead_rows(torch.einsum("bhqk,bkhd->bqhd", probs, v), alive)
    if alive is not None:
        lse = lse.masked_fill(~alive[:, None, None], float("-inf"))
    return out, lse


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest |x - ref| in float64, with matching infinities counted as equal."""
    x, ref = x.double(), ref.double()
    both_inf = torch.isinf(x) & torch.isinf(ref) & (x.sign() == ref.sign())
    return (x - ref).abs().masked_fill(both_inf, 0.0).max().item()


def assert_within_budget(name: str, ours, ref, baseline, factor: float, slack: float = 1e-5) -> None:
    """|ours - ref| <= factor * |baseline - ref| + slack (flash-attn's rule)."""
    ours_error, baseline_error = max_error(ours, ref), max_error(baseline, ref)
    assert not torch.isnan(ours).any(), f"{name} has NaN"
    assert ours_error <= factor * baseline_error + slack, (
        f"{name}: error {ours_error:.3e} > {factor} x PyTorch low-precision error {baseline_error:.3e} + {slack}"
    )


def widest_dtype(backend: str) -> torch.dtype:
    """float32 where the backend takes it, else float16 (the cuda backend)."""
    return torch.float32 if torch.float32 in BACKENDS[backend].dtypes else torch.float16


def skip_unless_supported(backend: str, q, ks, vs, masks, return_lse=True) -> None:
    """Skip the test, with the dispatcher's reasons, when backend cannot run this call here."""
    reasons = BACKENDS[backend].reasons(AttentionCall.of(q, ks, vs, masks, return_lse))
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")


def grads(outputs: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], seed_grads) -> List[torch.Tensor]:
    """Gradients of sum(output * seed) with respect to inputs."""
    loss = sum((o.float() * g.float()).sum() for o, g in zip(outputs, seed_grads))
    return list(torch.autograd.grad(loss, list(inputs)))
