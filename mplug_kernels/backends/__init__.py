"""The backend dispatcher: every backend declares what it supports; ``auto`` picks the fastest that can.

Adding a backend: write a ``Backend`` subclass and list it in ``_BACKEND_CLASSES`` below.
"""
from __future__ import annotations

from typing import Dict, List

from mplug_kernels.backends.base import AttentionCall, Backend
from mplug_kernels.backends.baselines import FlashAttnBackend, XFormersBackend
from mplug_kernels.backends.cuda import CudaBackend
from mplug_kernels.backends.reference import ReferenceBackend
from mplug_kernels.backends.sdpa import SdpaBackend
from mplug_kernels.backends.triton import TritonBackend

_BACKEND_CLASSES = (CudaBackend, TritonBackend, FlashAttnBackend, XFormersBackend, SdpaBackend, ReferenceBackend)
BACKENDS: Dict[str, Backend] = {cls.name: cls() for cls in _BACKEND_CLASSES}

__all__ = ["AttentionCall", "Backend", "BACKENDS", "get_backend", "select_backend", "backend_reasons"]


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {sorted(BACKENDS)}, got {name!r}")
    return BACKENDS[name]


def backend_reasons(call: AttentionCall) -> Dict[str, List[str]]:
    """For every backend, the reasons it cannot take ``call`` (empty list = it can)."""
    return {name: backend.reasons(call) for name, backend in BACKENDS.items()}


def _no_backend_error(requested: str, call: AttentionCall) -> ValueError:
    lines = [f"  {name}: {'; '.join(reasons) or 'supported'}" for name, reasons in backend_reasons(call).items()]
    return ValueError(f"backend {requested!r} cannot run {call.describe()}. Every backend's reasons:\n" + "\n".join(lines))


def select_backend(name: str, call: AttentionCall) -> Backend:
    """The backend that runs ``call``: the named one, or with 'auto' the best-ranked one that supports it."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str, got {type(name).__name__}")
    if name == "auto":
        candidates = sorted(BACKENDS.values(), key=lambda backend: backend.rank(call))
        for backend in candidates:
            if not backend.reasons(call):
                return backend
        raise _no_backend_error(name, call)
    backend = get_backend(name)
    if backend.reasons(call):
        raise _no_backend_error(name, call)
    return backend
