"""mplug: the mPLUG vision-language model (arXiv 2205.12005) built on mplug_kernels layers."""
from mplug.checkpoint import LoadResult, load_official_checkpoint
from mplug.config import MPLUGConfig
from mplug.decoder import DecoderCache
from mplug.model import MPLUG

__all__ = ["MPLUG", "MPLUGConfig", "DecoderCache", "LoadResult", "load_official_checkpoint"]
