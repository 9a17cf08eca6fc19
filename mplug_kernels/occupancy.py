"""Occupancy of a kernel on one streaming multiprocessor, and the split-KV plan of the forward (split_plan).

Both kernel backends (CUDA and Triton) choose their split-KV plan here, from the CTAs per SM their compiled
kernel really reaches (registers, shared memory, threads) and a cost model of bytes, waves and start-up.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple, Union

from mplug_kernels.backends.kernel_inputs import MAX_SPLITS

# A split count is taken only if its modelled time is within this factor of the best one: at (nearly) equal
# time fewer splits win, since each split adds partial outputs to write, read and combine.
TIME_TOLERANCE = 1.1
# Keys of one key tile of the forward (CUDA kKeysPerTile; Triton's BLOCK_N candidates divide it): a split holds
# a multiple of it.
KEY_TILE = 64
# The split model's constants (assumptions, not measurements): a CTA's start-up (launch, Q load, first K/V
# tile's DRAM round trip), a lone CTA's time per key tile (about half a DRAM round trip: the two-stage pipeline
# overlaps the next tile's load with this one's MMAs), the combine launch behind the forward on one stream.
CTA_START_S = 1.0e-6
TILE_LATENCY_S = 0.4e-6
COMBINE_START_S = 1.5e-6
# Partial outputs (written and read, fp32) stay below this fraction of the K/V bytes a forward reads.
PARTIAL_BUDGET = 0.5
# HBM bytes per second by architecture: A100 80GB (2.0 TB/s) and H100 SXM (3.35 TB/s); pass `bandwidth` for others.
HBM_BANDWIDTH = {80: 2.0e12, 90: 3.35e12}
# CTAs per SM of the CUDA forward by (arch, head dim, query rows per CTA): nvcc 13.0's registers and shared
# memory as in bench/results/static/kernels.json (tests/test_occupancy.py checks the two agree). 128-row CTAs
# (32 rows per warp, D <= 80) take 200-255 registers per thread: 2 CTAs, 8 warps per SM.
CUDA_FORWARD_CTAS_PER_SM = {
    (80, 32, 32): 8, (80, 32, 64): 4, (80, 64, 32): 4, (80, 64, 64): 3, (80, 80, 32): 3, (80, 80, 64): 2,
    (80, 96, 32): 3, (80, 96, 64): 2, (80, 128, 64): 2,
    (90, 32, 32): 8, (90, 32, 64): 4, (90, 64, 32): 6, (90, 64, 64): 3, (90, 80, 32): 4, (90, 80, 64): 2,
    (90, 96, 32): 4, (90, 96, 64): 2, (90, 128, 64): 2,
    (80, 32, 128): 2, (90, 32, 128): 2, (80, 64, 128): 2, (90, 64, 128): 2, (80, 80, 128): 2, (90, 80, 128): 2,
}
# The CUDA forward's 128-row CTAs (csrc/attention.h forward_row_blocks): from this query length on, D <= 80.
CUDA_TALL_QUERIES = 128
CUDA_TALL_MAX_HEAD_DIM = 80
# CTAs per SM assumed for the Triton forward where no compiled kernel is at hand (its tuned configs reach 2-4).
TRITON_CTAS_PER_SM = 2


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


def split_keys(k_len: int, wanted_splits: int, key_tile: int = KEY_TILE) -> Tuple[int, int]:
    """(num_splits, split_size) covering k_len keys in about `wanted_splits` splits: split_size a multiple of
    key_tile; split i holds keys [i * split_size, (i + 1) * split_size), the last one every key left, and a last
    split shorter than one key tile is merged into the one before (so no split is empty or a sliver)."""
    if not 1 <= wanted_splits <= MAX_SPLITS:
        raise ValueError(f"wanted_splits must be in 1..{MAX_SPLITS}, got {wanted_splits}")
    k_len = max(k_len, 1)
    split_size = _ceil_div(_ceil_div(k_len, wanted_splits), key_tile) * key_tile
    num_splits = _ceil_div(k_len, split_size)
    if num_splits > 1 and k_len - (num_splits - 1) * split_size < key_tile:
        num_splits -= 1
    return num_splits, split_size


def forward_rows_per_cta(backend: str, q_len: int, head_dim: int, element_bytes: int) -> int:
    """Query rows of one forward CTA: CUDA 2 warps of 16 rows up to Lq = 32 (D <= 96), 4 warps of 32 rows from
    Lq = 128 on (D <= 80), else 4 warps of 16 (csrc/attention.h forward_warps, forward_row_blocks; the positional
    forward keeps 16-row warps); Triton BLOCK_M, 32 up to Lq = 32 or in fp32 else 64 (ops/triton_launch._block_m)."""
    if backend == "cuda":
        if q_len <= 32 and head_dim <= 96:
            return 32
        return 128 if q_len >= CUDA_TALL_QUERIES and head_dim <= CUDA_TALL_MAX_HEAD_DIM else 64
    return 32 if q_len <= 32 or element_bytes == 4 else 64


def default_ctas_per_sm(backend: str, arch: int, q_len: int, head_dim: int, element_bytes: int, *,
                        rows_per_cta: Optional[int] = None) -> int:
    """CTAs per SM of the forward kernel as compiled by nvcc 13.0 (CUDA_FORWARD_CTAS_PER_SM, the static report's
    numbers; rows_per_cta: that CUDA CTA height rather than the one launched) where no compiled kernel is at hand;
    TRITON_CTAS_PER_SM for Triton, whose tuned config varies."""
    if backend != "cuda":
        return TRITON_CTAS_PER_SM
    rows = rows_per_cta or forward_rows_per_cta("cuda", q_len, head_dim, element_bytes)
    return CUDA_FORWARD_CTAS_PER_SM[(arch if arch in SM_LIMITS else 90, head_dim, rows)]


@dataclass(frozen=True)
class SplitCost:
    """The modelled forward of one split choice: CTAs, waves, key tiles of the longest CTA, HBM bytes
    (K/V, partial outputs written and read back) and the modelled time in seconds."""

    num_splits: int
    split_size: int
    ctas: int
    waves: int
    tiles_per_cta: int
    kv_bytes: int
    partial_bytes: int
    seconds: float


def split_cost(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, element_bytes: int,
               num_splits: int, split_size: int, *, rows_per_cta: int, ctas_per_sm: int, sm_count: int,
               bandwidth: float, stored_dim: Optional[int] = None) -> SplitCost:
    """SplitCost of the forward of q [B, Lq, H, D] over k_len keys cut into `num_splits` splits of split_size
    keys (the model of split_plan; stored_dim: columns of one partial output row, D unless padded)."""
    stored_dim = stored_dim or head_dim
    query_tiles = _ceil_div(max(q_len, 1), rows_per_cta)
    unsplit_ctas = batch * heads * query_tiles
    ctas = unsplit_ctas * num_splits
    wave = max(1, ctas_per_sm) * max(1, sm_count)
    waves = max(1, _ceil_div(ctas, wave))
    last_split = k_len - (num_splits - 1) * split_size
    tiles_per_cta = max(_ceil_div(min(split_size, k_len), KEY_TILE), _ceil_div(max(last_split, 1), KEY_TILE))
    tile_bytes = 2 * KEY_TILE * head_dim * element_bytes
    # the CTAs of one (batch, head)'s query tiles read the same K/V tiles: HBM serves them once (L2 the rest)
    tile_time = max(TILE_LATENCY_S, min(ctas, wave) / query_tiles * tile_bytes / bandwidth)
    seconds = max(1.0, ctas / wave) * (CTA_START_S + tiles_per_cta * tile_time)
    kv_bytes = batch * heads * k_len * head_dim * element_bytes * 2
    partial_bytes = 0
    if num_splits > 1:
        partial_bytes = 2 * num_splits * batch * heads * q_len * (stored_dim + 1) * 4
        out_bytes = batch * heads * q_len * head_dim * element_bytes
        seconds += COMBINE_START_S + (partial_bytes + out_bytes) / bandwidth
    return SplitCost(num_splits, split_size, ctas, waves, tiles_per_cta, kv_bytes, partial_bytes, seconds)


def split_plan(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, element_bytes: int, *,
               backend: str = "cuda", arch: int = 90, sm_count: int = 132, ctas_per_sm: Optional[int] = None,
               bandwidth: Optional[float] = None) -> Tuple[int, int]:
    """(num_splits, split_size in keys) of the split-KV forward of q [B, Lq, H, D] over k_len keys.

    Both backends call it; ctas_per_sm is the compiled forward's occupancy (default_ctas_per_sm without one),
    bandwidth the HBM bytes per second (HBM_BANDWIDTH[arch] by default). The model (split_cost), in seconds:
    the grid is B * H * query tiles * splits CTAs, run in waves of ctas_per_sm * sm_count (an idle slot of a
    wave costs as much as a busy one). A wave lasts CTA_START_S (launch, Q load, filling the K/V pipeline)
    plus the longest CTA's key tiles, each taking TILE_LATENCY_S (a lone CTA's two-stage pipeline) or, when
    the wave's CTAs together read faster than HBM delivers, their K/V tile bytes over the bandwidth. A split
    plan adds its fp32 partial outputs and lse, written by the forward and read by the combine, the combine's
    output, and COMBINE_START_S for the combine launch. Candidates come from split_keys (whole key tiles, no
    sliver split), at most MAX_SPLITS, and keep partial bytes below PARTIAL_BUDGET of the K/V bytes; the
    fewest splits within TIME_TOLERANCE of the best time win. A grid that already fills a wave (B * H * query
    tiles >= ctas_per_sm * sm_count) is never split (FA2's num_splits_heuristic rule), and the result is the
    smallest over batches 1..B, so splits never grow with the batch.
    """
    key_tile = KEY_TILE
    full = split_keys(k_len, 1, key_tile)
    rows_per_cta = forward_rows_per_cta(backend, q_len, head_dim, element_bytes)
    per_sm = ctas_per_sm or default_ctas_per_sm(backend, arch, q_len, head_dim, element_bytes)
    unsplit_ctas = batch * heads * _ceil_div(max(q_len, 1), rows_per_cta)
    if batch * heads * q_len == 0 or k_len < 2 * key_tile or unsplit_ctas >= per_sm * sm_count:
        return full
    stored_dim = head_dim if backend == "cuda" else max(16, 1 << (head_dim - 1).bit_length())
    model = dict(rows_per_cta=rows_per_cta, ctas_per_sm=per_sm, sm_count=sm_count,
                 bandwidth=bandwidth or HBM_BANDWIDTH.get(arch, HBM_BANDWIDTH[90]), stored_dim=stored_dim)
    plans = sorted({split_keys(k_len, wanted, key_tile) for wanted in range(1, min(MAX_SPLITS, k_len // key_tile) + 1)})
    costs = [split_cost(batch, heads, q_len, k_len, head_dim, element_bytes, *plan, **model) for plan in plans]
    costs = [c for c in costs if c.num_splits == 1 or c.partial_bytes < PARTIAL_BUDGET * c.kv_bytes]
    fastest = min(c.seconds for c in costs)
    chosen = min((c for c in costs if c.seconds <= TIME_TOLERANCE * fastest), key=lambda c: c.num_splits)
    return chosen.num_splits, chosen.split_size


def fits_without_spills(
    registers_per_thread: int, spill_bytes: int, shared_bytes: int, threads: int, arch: Union[int, SMLimits],
) -> bool:
    """True when a compiled kernel spills nothing and one CTA of it fits an SM of sm_<arch> (or SMLimits)."""
    return spill_bytes == 0 and ctas_per_sm(registers_per_thread, shared_bytes, threads, arch) >= 1
