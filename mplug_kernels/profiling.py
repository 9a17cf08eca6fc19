"""Named profiler ranges (NVTX for nsys, record_function for torch.profiler): off by default.

Switch them on with the environment variable ``MPLUG_KERNELS_NVTX=1`` or ``enable_nvtx()``. Layers call
``with nvtx_range("fusion.layer3"):`` or decorate a method with ``@nvtx_annotate("decoder.step")``; while
ranges are off both cost one boolean check and stay transparent to torch.compile.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Callable, Iterator, TypeVar

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


def nvtx_range(name: str):
    """Context manager: an NVTX + torch.profiler range called ``name`` when ranges are on, else a no-op."""
    if _enabled and not torch.compiler.is_compiling():
        return _emit_range(name)
    return contextlib.nullcontext()


def nvtx_annotate(name: str) -> Callable[[F], F]:
    """Decorator: run the function inside ``nvtx_range(name)`` (decided at call time, so enabling later works)."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            with nvtx_range(name):
                return function(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate
