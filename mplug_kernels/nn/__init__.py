"""Thin nn.Modules over the mplug_kernels ops, with BERT submodule names."""
from mplug_kernels.nn.co_attention import CoAttention
from mplug_kernels.nn.co_attention_stack import CoAttentionStack, VisionKVCache
from mplug_kernels.nn.connected_attention import ConnectedAttention
from mplug_kernels.nn.hyper_attention import HyperAttention, pack_images

__all__ = ["CoAttention", "CoAttentionStack", "ConnectedAttention", "HyperAttention", "VisionKVCache", "pack_images"]
