"""Thin nn.Modules over the mplug_kernels ops, with BERT submodule names."""
from mplug_kernels.nn.co_attention import CoAttention
from mplug_kernels.nn.co_attention_stack import CoAttentionStack, VisionKVCache
from mplug_kernels.nn.connected_attention import ConnectedAttention

__all__ = ["CoAttention", "CoAttentionStack", "ConnectedAttention", "VisionKVCache"]
