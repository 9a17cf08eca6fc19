"""Test session setup where no CUDA device exists: Triton runs under its CPU interpreter, and the
cuda backend runs the csrc/ kernels compiled for the CPU emulator (tests/cuda_emulator.py)."""
import os

import torch

import cuda_emulator

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if cuda_emulator.host_compiler() is not None and not os.environ.get("MPLUG_KERNELS_CUDA_EMULATOR"):
        os.environ["MPLUG_KERNELS_CUDA_EMULATOR"] = str(cuda_emulator.build())
