"""The ``cuda`` backend: hand-written CUDA C++ kernels from the ``mplug_kernels._C`` extension."""
from __future__ import annotations

from typing import Optional

from mplug_kernels.backends.base import Backend


def load_extension():
    """The compiled ``mplug_kernels._C`` module, or the ImportError explaining why it is absent."""
    try:
        from mplug_kernels import _C
    except ImportError as error:
        return error
    return _C


class CudaBackend(Backend):
    name = "cuda"

    def unavailable_reason(self) -> Optional[str]:
        extension = load_extension()
        if isinstance(extension, ImportError):
            return f"extension mplug_kernels._C not built ({extension})"
        return "extension mplug_kernels._C exports no attention kernels yet"

    def rank(self, call) -> int:
        return 0
