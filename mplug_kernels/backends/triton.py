"""The ``triton`` backend: the split-KV Triton kernels launched by mplug_kernels.ops.triton_launch."""
from __future__ import annotations

from functools import lru_cache
from typing import Optional

import torch
from torch.torch_version import TorchVersion

from mplug_kernels.backends.base import Backend
from mplug_kernels.backends.kernel_inputs import interpreter_on
from mplug_kernels.reference import alive_batch_rows, dead_queries_zeroed


@lru_cache(maxsize=None)
def _import_reason() -> Optional[str]:
    try:
        import mplug_kernels.ops.triton_launch  # noqa: F401
    except Exception as error:
        return f"triton not importable ({type(error).__name__}: {error})"
    return None


@lru_cache(maxsize=None)
def _interpreter_reason() -> Optional[str]:
    """Why this Triton's CPU interpreter cannot run the kernels (Triton 3.6 with NumPy >= 2.4), or None."""
    try:
        import numpy
        import triton
    except ImportError as error:
        return f"the Triton CPU interpreter needs numpy and triton ({error})"
    if TorchVersion(triton.__version__) < (3, 7) and TorchVersion(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s CPU interpreter calls int() on 1-element arrays, which NumPy "
                f"{numpy.__version__} rejects (fixed in Triton 3.7): pip install 'numpy<2.4'")
    return None


class TritonBackend(Backend):
    """Triton kernels; positional visibility and its queries that see no key (zeros, lse -inf) are handled in the
    kernels, the batch rows that keep no key without positions by zeroing their queries first."""

    name = "triton"
    supports_grouped_heads = True
    supports_positions = True

    @property
    def devices(self):
        return ("cuda", "cpu") if interpreter_on() else ("cuda",)

    def unavailable_reason(self):
        return _import_reason()

    def reasons(self, call):
        found = super().reasons(call)
        if call.device_type == "cpu" and not interpreter_on():
            found.append("runs on the CPU only under TRITON_INTERPRET=1")
        if call.device_type == "cpu" and interpreter_on() and (interpreter_reason := _interpreter_reason()):
            found.append(interpreter_reason)
        if call.device_type == "cpu" and call.dtype == torch.bfloat16:
            found.append("the Triton CPU interpreter's tl.dot on bfloat16 is wrong (bfloat16 runs on a GPU)")
        if call.device_type == "cuda" and not torch.cuda.is_available():
            found.append("no CUDA device")
        return found

    def rank(self, call) -> int:
        return 10 if call.device_type == "cuda" else 95

    def forward(self, q, ks, vs, masks, scale, positions=None):
        from mplug_kernels.ops import triton_launch

        if positions is None:
            q = dead_queries_zeroed(q, alive_batch_rows(ks, masks))
        return triton_launch.forward(q, ks, vs, masks, scale, positions)

    def backward(self, dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic, positions=None):
        from mplug_kernels.ops import triton_launch

        if positions is None:
            q = dead_queries_zeroed(q, alive_batch_rows(ks, masks))
        return triton_launch.backward(dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic, positions)
