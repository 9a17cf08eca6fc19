"""Public ops of mplug_kernels, one module each."""
from mplug_kernels.ops.co_attention import co_attention
from mplug_kernels.ops.concat_attention import concat_attention
from mplug_kernels.ops.merge import merge_attention_states

__all__ = ["co_attention", "concat_attention", "merge_attention_states"]
