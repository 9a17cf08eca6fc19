"""Named profiler ranges (NVTX for nsys, record_function for torch.profiler): off by default.

Switch them on with the environment variable ``MPLUG_KERNELS_NVTX=1`` or ``enable_nvtx()``. Code calls
``with nvtx_range("fusion.layer3"):``, decorates a function with ``@nvtx_annotate("decoder.step")``, or
``add_module_ranges(model, pattern)`` puts a range (named by module path) around chosen submodules' forward.
While ranges are off each costs one boolean check and stays transparent to torch.compile.
"""
from __future__ import annotations

import contextlib
import functools
import os
import re
from typing import Callable, Iterator, List, TypeVar

import torch

_ENV_VAR = "MPLUG_KERNELS_NVTX"
_enabled = os.environ.get(_ENV_VAR, "0") == "1"

F = TypeVar("F", bound=Callable)


def enable_nvtx(enabled: bool = True) -> None:
    """Switch the named ranges on (or off with ``enabled=False``) for the whole process."""
    global _enabled
    _enabled = bool(enabled)


def nvtx_enabled() -> bool:
    """True when named ranges are being emitted."""
    return _enabled


@contextlib.contextmanager
def _emit_range(name: str) -> Iterator[None]:
    use_nvtx = torch.cuda.is_available()
    with torch.profiler.record_function(name):
        if use_nvtx:
            torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            if use_nvtx:
                torch.cuda.nvtx.range_pop()


def _ranges_active() -> bool:
    return _enabled and not torch.compiler.is_compiling()


def nvtx_range(name: str):
    """Context manager: an NVTX + torch.profiler range called ``name`` when ranges are on, else a no-op."""
    return _emit_range(name) if _ranges_active() else contextlib.nullcontext()


def nvtx_annotate(name: str) -> Callable[[F], F]:
    """Decorator: run the function inside ``nvtx_range(name)`` (decided at call time, so enabling later works)."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with nvtx_range(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate


def add_module_ranges(root: torch.nn.Module, pattern: str) -> List[torch.utils.hooks.RemovableHandle]:
    """Range around the forward of every submodule of root whose dotted name fully matches the regex pattern.

    The range is named by the module path (e.g. ``fusion_encoder.encoder.layer.3``); returns the hook handles.
    """
    matcher = re.compile(pattern)
    handles = []
    for name, module in root.named_modules():
        if name and matcher.fullmatch(name):
            handles.append(module.register_forward_pre_hook(_open_hook(name)))
            handles.append(module.register_forward_hook(_close_hook, always_call=True))
    return handles


def _open_hook(name: str):
    def open_range(module, args):
        if _ranges_active():
            context = _emit_range(name)
            context.__enter__()
            module.__dict__.setdefault("_profiling_ranges", []).append(context)

    return open_range


def _close_hook(module, args, output):
    open_ranges = module.__dict__.get("_profiling_ranges")
    if open_ranges:
        open_ranges.pop().__exit__(None, None, None)
