"""Thin nn.Modules over the mplug_kernels ops, with BERT submodule names."""
from mplug_kernels.nn.co_attention import CoAttention

__all__ = ["CoAttention"]
