"""The ``cuda`` backend: hand-written CUDA C++ kernels from the ``mplug_kernels._C`` extension.

The extension takes raw pointers, element strides and the current stream (it does not link
libtorch); this module allocates outputs and workspaces with torch and passes them in.

Where ``MPLUG_KERNELS_CUDA_EMULATOR`` names a module file, that CPU emulation build of the same
kernel sources (see tests/cuda_emulator.py) replaces ``_C`` and the backend runs on CPU tensors.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import lru_cache
from typing import List, Optional, Sequence, Tuple

import torch

from mplug_kernels.backends.base import Backend, Positions
from mplug_kernels.backends.kernel_inputs import forced_num_splits, mask_bytes, unit_stride_rows
from mplug_kernels.occupancy import split_keys, split_plan

HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPE_NAMES = {torch.float16: "float16", torch.bfloat16: "bfloat16"}
_NO_VIEW = (0, 0, 0, 0)
EMULATOR_ENV = "MPLUG_KERNELS_CUDA_EMULATOR"
# The emulator plans split-KV as for an H100's 132 multiprocessors.
EMULATED_SM_COUNT = 132


def _load_module_file(path: str):
    spec = importlib.util.spec_from_file_location("_C", path)
    if spec is None or not os.path.isfile(path):
        raise ImportError(f"{EMULATOR_ENV}={path} is not a module file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@lru_cache(maxsize=None)
def installed_extension():
    """``mplug_kernels._C`` as pip built it (never the emulator), or the ImportError explaining why it is absent."""
    try:
        from mplug_kernels import _C
    except ImportError as error:
        return error
    return _C


@lru_cache(maxsize=None)
def load_extension():
    """The kernels' module (``mplug_kernels._C``, or the emulator build named by
    ``MPLUG_KERNELS_CUDA_EMULATOR``), or the ImportError explaining why it is absent."""
    emulator = os.environ.get(EMULATOR_ENV)
    if not emulator:
        return installed_extension()
    try:
        return _load_module_file(emulator)
    except ImportError as error:
        return error


@lru_cache(maxsize=None)
def kernel_device_type() -> str:
    """"cpu" when the loaded extension is the CPU emulator, else "cuda"."""
    extension = load_extension()
    emulated = not isinstance(extension, ImportError) and extension.build_info().get("platform") == "cpu-emulator"
    return "cpu" if emulated else "cuda"


def build_info() -> dict:
    """Whether ``_C`` is built (``built``), for which ``archs``, with which ``nvcc``, else the ``error``."""
    extension = load_extension()
    if isinstance(extension, ImportError):
        return {
            "built": False, "archs": None, "nvcc": None,
            "error": f"{extension} (reinstall with nvcc on PATH or CUDA_HOME set; `pip install -v .` shows why)",
        }
    info = extension.build_info()
    return {"built": True, "platform": info.get("platform", "cuda"), "archs": info["archs"],
            "nvcc": f"{info['nvcc']} ({info['nvcc_path']})", "error": None,
            "dtypes": info["dtypes"], "head_dims": info["head_dims"], "kernels": len(info["kernels"])}


def _kernel_ready(x: torch.Tensor) -> torch.Tensor:
    """x when the kernels can read its rows with 16-byte loads, else a contiguous, aligned copy."""
    aligned_strides = all(stride % 8 == 0 or size == 1 for stride, size in zip(x.stride()[:-1], x.shape[:-1]))
    if x.stride(-1) == 1 and aligned_strides and x.data_ptr() % 16 == 0:
        return x
    return x.clone(memory_format=torch.contiguous_format)


def _view(x: Optional[torch.Tensor]) -> Tuple[int, int, int, int]:
    """(data_ptr, stride_b, stride_s, stride_h) of a [B, S, H, D] tensor."""
    return _NO_VIEW if x is None else (x.data_ptr(), x.stride(0), x.stride(1), x.stride(2))


def _pointer(x: Optional[torch.Tensor]) -> int:
    return 0 if x is None else x.data_ptr()


def _rows(x: Optional[torch.Tensor]) -> Tuple[int, int]:
    """(data_ptr, stride_b) of a [B, L] tensor whose L stride is 1 (a 32-bit position or mask row); (0, 0) when absent."""
    return (0, 0) if x is None else (x.data_ptr(), x.stride(0))


def _position_rows(positions: Optional[Positions]) -> Tuple[Optional[list], Optional[torch.Tensor]]:
    """(per source key positions or None, query positions), int32 rows with a unit stride along L; (None, None)
    without positions."""
    if positions is None:
        return None, None
    return [unit_stride_rows(p) for p in positions.keys], unit_stride_rows(positions.queries)


def _sources(ks, vs, masks, dks=None, dvs=None, key_positions=None) -> list:
    dks = dks or [None] * len(ks)
    dvs = dvs or [None] * len(ks)
    key_positions = key_positions or [None] * len(ks)
    return [
        (_view(k), _view(v), _pointer(m), m.stride(0) if m is not None else 0, k.shape[1], _view(dk), _view(dv),
         *_rows(p))
        for k, v, m, dk, dv, p in zip(ks, vs, masks, dks, dvs, key_positions)
    ]


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return EMULATED_SM_COUNT


def _on_device(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@lru_cache(maxsize=None)
def _forward_launch(extension, dtype: str, head_dim: int, q_len: int, device: torch.device) -> Tuple[int, int]:
    """(query rows per CTA, CTAs per SM) of the forward kernel for these inputs on `device`."""
    return extension.forward_launch(dtype, head_dim, q_len)


def _arch(device: torch.device) -> int:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return 90


def _split(extension, q: torch.Tensor, total_keys: int) -> Tuple[int, int]:
    """(num_splits, split_size) of the forward: the forced count's key ranges, else occupancy.split_plan with the
    forward kernel's real CTAs per SM on this device."""
    if forced_num_splits():
        return split_keys(total_keys, forced_num_splits(), extension.KEYS_PER_TILE)
    batch, q_len, heads, head_dim = q.shape
    _, ctas_per_sm = _forward_launch(extension, DTYPE_NAMES[q.dtype], head_dim, max(q_len, 1), q.device)
    return split_plan(batch, heads, q_len, total_keys, head_dim, q.element_size(), backend="cuda",
                      arch=_arch(q.device), sm_count=_sm_count(q.device), ctas_per_sm=ctas_per_sm)


def forward(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]], softmax_scale: float, positions: Optional[Positions] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] and lse float32 [B, H, Lq] of q over the concatenated sources (CUDA kernels), under
    positional visibility when positions is given."""
    extension = load_extension()
    q = _kernel_ready(q)
    ks, vs = [_kernel_ready(k) for k in ks], [_kernel_ready(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    key_positions, query_positions = _position_rows(positions)
    batch, q_len, heads, head_dim = q.shape
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    total_keys = sum(k.shape[1] for k in ks)
    with _on_device(q.device):
        num_splits, split_size = _split(extension, q, total_keys)
    part_out = part_lse = key_tile_words = None
    if positions is None and any(m is not None for m in masks):
        key_tile_words = torch.empty((batch, -(-total_keys // extension.KEYS_PER_TILE)), dtype=torch.int64,
                                     device=q.device)
    if num_splits > 1:
        part_out = torch.empty((num_splits, batch * heads, q_len, head_dim), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((num_splits, batch * heads, q_len), dtype=torch.float32, device=q.device)
    with _on_device(q.device):
        extension.attention_forward(
            dtype=DTYPE_NAMES[q.dtype], shape=tuple(q.shape), scale=softmax_scale, q=_view(q), out=_view(out),
            lse=lse.data_ptr(), sources=_sources(ks, vs, masks, key_positions=key_positions), num_splits=num_splits,
            split_size=split_size, part_out=_pointer(part_out), part_lse=_pointer(part_lse), stream=_stream(q.device),
            kv_heads=ks[0].shape[2], query_positions=_rows(query_positions), key_tile_words=_pointer(key_tile_words),
        )
    return out, lse


def backward(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor,
    lse: torch.Tensor, softmax_scale: float, deterministic: bool, positions: Optional[Positions] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(dq, dks, dvs); dQ by float32 atomics unless deterministic (then a dQ kernel without atomics)."""
    extension = load_extension()
    key_positions, query_positions = _position_rows(positions)
    q, dout, out = _kernel_ready(q), _kernel_ready(dout), _kernel_ready(out)
    ks, vs = [_kernel_ready(k) for k in ks], [_kernel_ready(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    lse = lse.float().contiguous()
    dlse = None if dlse is None else dlse.float().contiguous()
    delta = torch.empty_like(lse)
    dks = [torch.empty(k.shape, dtype=k.dtype, device=k.device) for k in ks]
    dvs = [torch.empty(v.shape, dtype=v.dtype, device=v.device) for v in vs]
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if deterministic else None
    dq_accum = None if deterministic else torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    with _on_device(q.device):
        extension.attention_backward(
            dtype=DTYPE_NAMES[q.dtype], shape=tuple(q.shape), scale=softmax_scale, q=_view(q), out=_view(out),
            lse=lse.data_ptr(), sources=_sources(ks, vs, masks, dks, dvs, key_positions), dout=_view(dout),
            dq=_view(dq), dq_accum=_pointer(dq_accum), dlse=_pointer(dlse), delta=delta.data_ptr(),
            stream=_stream(q.device), kv_heads=ks[0].shape[2], query_positions=_rows(query_positions),
        )
    return (dq if deterministic else dq_accum.to(q.dtype)), dks, dvs


class CudaBackend(Backend):
    name = "cuda"
    dtypes = tuple(DTYPE_NAMES)
    head_dims = HEAD_DIMS
    supports_grouped_heads = True
    supports_positions = True

    @property
    def devices(self) -> Tuple[str, ...]:
        return (kernel_device_type(),)

    def unavailable_reason(self) -> Optional[str]:
        extension = load_extension()
        if isinstance(extension, ImportError):
            return f"extension mplug_kernels._C not built ({extension})"
        return None

    def reasons(self, call):
        found = super().reasons(call)
        if found or call.device_type != "cuda":
            return found
        if not torch.cuda.is_available():
            return ["no CUDA device"]
        if torch.cuda.get_device_capability() < (8, 0):
            return [f"needs compute capability >= 8.0, the current device has {torch.cuda.get_device_capability()}"]
        return []

    def rank(self, call) -> int:
        # behind triton (10) until these kernels have been verified and benchmarked on a GPU; the
        # CPU emulator is a correctness tool, the last choice of `auto`
        return 15 if call.device_type == "cuda" else 99

    def forward(self, q, ks, vs, masks, scale, positions=None):
        # the kernels select hidden scores out and skip tiles without a visible key: a row seeing no key is 0
        return forward(q, ks, vs, masks, scale, positions)

    def backward(self, dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic, positions=None):
        return backward(dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic, positions)
