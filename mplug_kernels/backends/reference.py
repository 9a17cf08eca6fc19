"""The ``reference`` backend: plain PyTorch math in float32, on every device; the ground truth."""
from __future__ import annotations

import torch

from mplug_kernels import reference
from mplug_kernels.backends.base import Backend


class ReferenceBackend(Backend):
    name = "reference"
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    devices = ("cpu", "cuda", "mps", "xpu", "meta")
    supports_grouped_heads = True
    supports_positions = True

    def rank(self, call) -> int:
        return 90

    def forward(self, q, ks, vs, masks, scale, positions=None):
        return reference.attention_forward(q, ks, vs, masks, scale, positions)

    def backward(self, dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic, positions=None):
        return reference.attention_backward(dout, dlse, q, ks, vs, masks, out, lse, scale, positions)
