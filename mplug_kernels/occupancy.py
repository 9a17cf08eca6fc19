"""Occupancy of a kernel on one streaming multiprocessor, and the split-KV count that fills the GPU's waves.

Both kernel backends (CUDA and Triton) choose their split-KV count here, from the CTAs per SM their compiled
kernel really reaches (registers, shared memory, threads), not from "fewer CTAs than SMs".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from mplug_kernels.backends.kernel_inputs import MAX_SPLITS

# A split count is taken only if its modelled time is within this factor of the best one: at (nearly) equal
# time fewer splits win, since each split adds partial outputs to write, read and combine.
TIME_TOLERANCE = 1.1


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resource limits of one architecture (CUDA Programming Guide, compute capability tables)."""

    registers: int = 65536
    sub_partitions: int = 4
    max_registers_per_thread: int = 255
    max_threads: int = 2048
    max_ctas: int = 32
    shared_bytes: int = 233472
    max_shared_per_cta: int = 232448
    reserved_shared_per_cta: int = 1024


SM_LIMITS = {
    80: SMLimits(shared_bytes=167936, max_shared_per_cta=166912),
    90: SMLimits(shared_bytes=233472, max_shared_per_cta=232448),
}


def device_limits(device) -> SMLimits:
    """SMLimits of a CUDA device (torch.device) from its properties, defaulting to sm_90's where one is missing."""
    import torch

    properties = torch.cuda.get_device_properties(device)
    default = SM_LIMITS[90]
    return SMLimits(
        registers=getattr(properties, "regs_per_multiprocessor", default.registers),
        max_threads=getattr(properties, "max_threads_per_multi_processor", default.max_threads),
        shared_bytes=getattr(properties, "shared_memory_per_multiprocessor", default.shared_bytes),
        max_shared_per_cta=getattr(properties, "shared_memory_per_block_optin", default.max_shared_per_cta),
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def ctas_per_sm(registers_per_thread: int, shared_bytes: int, threads: int, arch: Union[int, SMLimits]) -> int:
    """CTAs of one kernel resident on one SM of sm_<arch> (or of given SMLimits; 0 when one CTA does not
    fit) from its registers per thread, shared memory per CTA and threads per CTA."""
    limits = arch if isinstance(arch, SMLimits) else SM_LIMITS[arch]
    if shared_bytes > limits.max_shared_per_cta or registers_per_thread > limits.max_registers_per_thread:
        return 0
    warps = _ceil_div(threads, 32)
    registers_per_warp = _ceil_div(max(registers_per_thread, 1) * 32, 256) * 256
    warps_by_registers = limits.sub_partitions * (limits.registers // limits.sub_partitions // registers_per_warp)
    by_registers = warps_by_registers // warps
    by_threads = limits.max_threads // (warps * 32)
    by_shared = limits.shared_bytes // (shared_bytes + limits.reserved_shared_per_cta)
    return max(0, min(limits.max_ctas, by_registers, by_threads, by_shared))


def num_splits_for_occupancy(
    ctas: int, ctas_per_sm: int, sm_count: int, key_tiles: int, max_splits: int = MAX_SPLITS,
) -> int:
    """Split-KV count for a grid of `ctas` CTAs (before splitting) whose keys come in `key_tiles` pieces.

    A wave is `ctas_per_sm * sm_count` CTAs running at once (the kernel's real occupancy). Splitting the
    keys s ways gives ctas*s CTAs of ceil(key_tiles / s) tiles each, so its modelled time is
    ceil(ctas*s / wave) waves x ceil(key_tiles / s) tiles: an idle slot in a wave costs as much as a busy
    one. Candidates are the counts that cut the tiles evenly (no empty split), at most `key_tiles` and
    `max_splits`; the fewest splits within TIME_TOLERANCE of the best time win. So a grid that already
    fills its waves well is not split, and a small one (B = 1) is split until it fills a wave or runs out
    of key tiles.
    """
    if ctas <= 0 or key_tiles <= 1:
        return 1
    wave = max(1, ctas_per_sm) * max(1, sm_count)
    even_counts = {_ceil_div(key_tiles, _ceil_div(key_tiles, s)) for s in range(1, min(max_splits, key_tiles) + 1)}
    candidates = sorted(even_counts)
    time = {s: _ceil_div(ctas * s, wave) * _ceil_div(key_tiles, s) for s in candidates}
    best = min(time.values())
    return next(s for s in candidates if time[s] <= TIME_TOLERANCE * best)


def fits_without_spills(
    registers_per_thread: int, spill_bytes: int, shared_bytes: int, threads: int, arch: Union[int, SMLimits],
) -> bool:
    """True when a compiled kernel spills nothing and one CTA of it fits an SM of sm_<arch> (or SMLimits)."""
    return spill_bytes == 0 and ctas_per_sm(registers_per_thread, shared_bytes, threads, arch) >= 1
