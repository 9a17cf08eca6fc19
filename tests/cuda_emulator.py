"""Builds the CPU emulation of the CUDA extension: the real csrc/ kernel sources compiled by the host
C++ compiler against csrc/tests/emulator/cpu_platform.h, as a pybind11 module with _C's interface.

Where no GPU exists, conftest.py builds it once (cached under build/cpu_emulator/<source hash>/)
and points MPLUG_KERNELS_CUDA_EMULATOR at it, so backend="cuda" tests run the kernels on CPU tensors.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
EMULATOR = CSRC / "tests" / "emulator"
SOURCES = ["bindings.cpp", "attention_api.cpp", "forward_float16.cu", "forward_bfloat16.cu",
           "backward_float16.cu", "backward_bfloat16.cu"]
FLAGS = ["-std=c++20", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-Wno-unknown-pragmas", "-U_FORTIFY_SOURCE"]
BUILD_CONFIG = """#pragma once
#define MPLUG_PLATFORM "cpu-emulator"
#define MPLUG_CUDA_ARCHS "none (CPU emulation)"
#define MPLUG_NVCC_VERSION "none"
#define MPLUG_NVCC_PATH "{compiler}"
"""


def host_compiler() -> Optional[str]:
    """The host C++ compiler (g++, else c++), or None."""
    return shutil.which("g++") or shutil.which("c++")


def _pybind11_include() -> str:
    """pybind11's headers: the pybind11 package, else the copy shipped inside torch."""
    if importlib.util.find_spec("pybind11") is not None:
        import pybind11

        return pybind11.get_include()
    import torch

    return str(Path(torch.__file__).parent / "include")


def _source_hash(compiler: str) -> str:
    digest = hashlib.sha256(" ".join([compiler, *FLAGS]).encode())
    for path in sorted([*CSRC.glob("*.h"), *CSRC.glob("*.cuh"), *CSRC.glob("*.cu"), *CSRC.glob("*.cpp"),
                        *EMULATOR.glob("*.h"), Path(__file__)]):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:16]


def kernel_objects(module: Path) -> List[Path]:
    """The object files of the kernels and their host API (everything but the Python binding) of a built module."""
    return [module.parent / (source + ".o") for source in SOURCES if source != "bindings.cpp"]


def build(build_root: Path = ROOT / "build" / "cpu_emulator") -> Path:
    """Path of the emulated _C module, compiling it when its sources changed; raises when no compiler exists."""
    compiler = host_compiler()
    if compiler is None:
        raise RuntimeError("no host C++ compiler (g++ or c++) to build the CUDA emulator")
    out_dir = build_root / _source_hash(compiler)
    module = out_dir / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if module.is_file():
        return module
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "build_config.h").write_text(BUILD_CONFIG.format(compiler=compiler))
    includes = [f"-I{EMULATOR}", f"-I{CSRC}", f"-I{out_dir}", f"-I{_pybind11_include()}",
                f"-I{sysconfig.get_paths()['include']}"]
    defines = ['-DMPLUG_PLATFORM_HEADER="cpu_platform.h"']

    def compile_one(source: str) -> Path:
        obj = out_dir / (source + ".o")
        subprocess.run([compiler, *FLAGS, *defines, *includes, "-x", "c++", "-c", str(CSRC / source), "-o", str(obj)],
                       check=True)
        return obj

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, SOURCES))
    partial = module.with_suffix(".partial")
    subprocess.run([compiler, "-shared", *map(str, objects), "-o", str(partial)], check=True)
    partial.rename(module)
    return module
