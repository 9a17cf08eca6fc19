"""mplug-kernels: fused attention kernels for the mPLUG vision-language architecture."""
from mplug_kernels import nn
from mplug_kernels.ops import co_attention, concat_attention, merge_attention_states

__version__ = "0.1.0"
__all__ = ["co_attention", "concat_attention", "merge_attention_states", "nn", "__version__"]
