"""mplug: the mPLUG vision-language model (arXiv 2205.12005) built on mplug_kernels layers."""
from mplug.model.checkpoint import LoadResult, load_official_checkpoint
from mplug.model.config import MPLUGConfig
from mplug.model.decoder import DecoderCache
from mplug.model.mplug import MPLUG

__all__ = ["MPLUG", "MPLUGConfig", "DecoderCache", "LoadResult", "load_official_checkpoint"]
