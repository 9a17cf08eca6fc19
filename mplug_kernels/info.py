"""`python -m mplug_kernels.info`: versions, devices, and every backend's availability with its reasons."""
from __future__ import annotations

import argparse
import os
import platform
from typing import Optional, Sequence

import torch

from mplug_kernels import __version__
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.cuda import EMULATOR_ENV, build_info


def _typical_call(device_type: str) -> AttentionCall:
    """A bfloat16 (float32 on the CPU) co-attention training call with a mask and lse, D = 64."""
    dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
    return AttentionCall(device_type, dtype, 64, 1, True, True, True)


def _extension_line() -> str:
    info = build_info()
    if not info["built"]:
        return f"CUDA extension _C: not built ({info['error']})"
    if info["platform"] == "cpu-emulator":
        return f"CUDA kernels: CPU emulator build from {os.environ.get(EMULATOR_ENV)} ({info['kernels']} kernels)"
    return (
        f"CUDA extension _C: built for archs {info['archs']} with nvcc {info['nvcc']}; "
        f"{info['kernels']} kernels, dtypes {info['dtypes']}, head dims {info['head_dims']}"
    )


def report() -> str:
    """The text printed by ``python -m mplug_kernels.info``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.cuda.get_device_name() if device_type == "cuda" else f"CPU ({platform.machine()})"
    lines = [
        f"mplug_kernels {__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {triton_version}",
        f"device: {device}",
        _extension_line(),
        f"backends for {_typical_call(device_type).describe()}:",
    ]
    call = _typical_call(device_type)
    for name, backend in sorted(BACKENDS.items(), key=lambda item: item[1].rank(call)):
        unavailable = backend.unavailable_reason()
        reasons = backend.reasons(call)
        state = "unavailable" if unavailable else ("supported" if not reasons else "available")
        lines.append(f"  {name:<11} {state:<12} {'; '.join(reasons)}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: parse argv (only --help), print the report."""
    argparse.ArgumentParser(prog="python -m mplug_kernels.info", description="Print the versions, the device, whether the CUDA extension is built, and every attention "
                            "backend's availability here with its reasons.").parse_args(argv)
    print(report())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
