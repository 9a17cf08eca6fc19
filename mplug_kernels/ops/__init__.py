"""Public ops of mplug_kernels, one module each."""
from mplug_kernels.ops.co_attention import co_attention

__all__ = ["co_attention"]
