"""Launches of the Triton kernels for short queries attending to up to four long key/value sources.

The kernels live in triton_forward (forward and split-KV combine) and triton_backward (delta, dK/dV, dQ),
their shared tile helpers in triton_tiles; this module chooses block sizes, autotuning candidates and the
split-KV count (from the kernel's occupancy: mplug_kernels.occupancy), builds each Launch and runs it.
Block sizes are chosen per head dim and dtype so that no launch spills or exceeds shared memory on sm_80 or
sm_90; forward autotuning candidates that would are pruned before tuning (bench/static_triton.py compiles
every launch ahead of time to check). Layout [B, S, H, D] with any strides (last dim contiguous). Positional
visibility (Positions: int32 key positions per source, query positions) reaches the kernels as pointers under
constexpr flags, so a launch without positions compiles to the same code.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import triton

from mplug_kernels.backends.base import Positions
from mplug_kernels.backends.kernel_inputs import forced_num_splits, interpreter_on, mask_bytes
from mplug_kernels.occupancy import (
    KEY_TILE, SMLimits, ctas_per_sm, device_limits, fits_without_spills, split_keys, split_plan,
)
from mplug_kernels.ops.triton_backward import _delta_kernel, _dkdv_kernel, _dq_kernel
from mplug_kernels.ops.triton_forward import _combine_kernel, _forward_kernel

LOG2E = 1.4426950408889634
MAX_SOURCES = 4


# ---------------------------------------------------------------- configurations

def _config(block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


# Forward autotuning candidates (BLOCK_N, num_warps, num_stages) per element size (2: fp16/bf16, 4: fp32); the
# first that fits is the configuration run untuned (_untuned_config). Before tuning, each candidate is compiled
# for the device and dropped when it spills or does not fit (_prune_forward); bench/static_triton.py compiles
# all of them for sm_80 and sm_90 at every head dim and BLOCK_M. fp32 dots are exact (ieee: FMA, not tensor
# cores), which holds whole operand rows per thread, so fp32 tiles are small and single-stage.
FORWARD_CANDIDATES = {
    2: ((32, 4, 2), (64, 4, 2), (64, 4, 3), (128, 8, 2)),
    4: ((16, 8, 1), (16, 4, 1), (32, 8, 1)),
}
FORWARD_CONFIGS = [_config(*candidate) for candidate in dict.fromkeys(sum(FORWARD_CANDIDATES.values(), ()))]
# MPLUG_KERNELS_TRITON_AUTOTUNE=0 runs the forward with _untuned_config instead of tuning (GPU test runs,
# where tuning every new shape would cost more than the tests; every configuration has its own test).
AUTOTUNE_ENV = "MPLUG_KERNELS_TRITON_AUTOTUNE"

# Backward blocks per (element size, BLOCK_D): (largest BLOCK_M, BLOCK_N, num_warps, num_stages) of the dK/dV
# and dQ kernels, chosen so that neither spills nor exceeds sm_80's shared memory (bench/static_triton.py).
BACKWARD_BLOCKS = {
    (2, 16): (64, 32, 4, 2), (2, 32): (64, 32, 4, 2), (2, 64): (64, 32, 8, 1), (2, 128): (32, 32, 8, 2),
    (4, 16): (32, 32, 8, 1), (4, 32): (32, 32, 8, 1), (4, 64): (16, 16, 4, 1), (4, 128): (16, 16, 8, 1),
}
# With positions the dK/dV kernel also holds key and query positions: at 64 query rows, fp16/bf16 D = 64 (255
# registers without them) spills 108 bytes on sm_80 (compiled ahead of time), so it takes at most 32 rows.
POSITIONS_DKDV_MAX_BLOCK_M = 32
DELTA_META = {"BLOCK_M": 16, "num_warps": 4, "num_stages": 1}
COMBINE_META = {"num_warps": 4, "num_stages": 1}

# Split-KV: a split holds a multiple of SPLIT_KEYS keys (occupancy.split_plan's key tile, as the CUDA forward's).
# Under the CPU interpreter no compiled kernel exists to read the occupancy from, so the plan sees
# INTERPRETER_SM_COUNT SMs of INTERPRETER_CTAS_PER_SM CTAs each.
SPLIT_KEYS = KEY_TILE
INTERPRETER_CTAS_PER_SM = 2
INTERPRETER_SM_COUNT = 4


def config_meta(config: triton.Config) -> dict:
    """The launch keyword arguments of one forward configuration."""
    return {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}


def _candidate(config: triton.Config) -> Tuple[int, int, int]:
    return config.kwargs["BLOCK_N"], config.num_warps, config.num_stages


def forward_candidates(element_bytes: int) -> List[triton.Config]:
    """The forward's autotuning candidates for elements of this many bytes (2 or 4)."""
    return [config for config in FORWARD_CONFIGS if _candidate(config) in FORWARD_CANDIDATES[element_bytes]]


def backward_meta(element_bytes: int, head_dim: int, q_len: int) -> dict:
    """BLOCK_M/N/D, num_warps and num_stages of the dK/dV and dQ kernels for this element size and shape."""
    block_d = _block_d(head_dim)
    max_block_m, block_n, warps, stages = BACKWARD_BLOCKS[(element_bytes, block_d)]
    return {"BLOCK_M": min(max_block_m, _block_m(q_len, element_bytes)), "BLOCK_N": block_n,
            "BLOCK_D": block_d, "num_warps": warps, "num_stages": stages}


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _block_m(q_len: int, element_bytes: int) -> int:
    """Query rows per program: 32 up to Lq = 32 (mPLUG's text, at most 2x padding at Lq = 25), else 64;
    always 32 in fp32, whose exact (FMA) dots spill at 64 rows of D = 128 on sm_90."""
    return 32 if q_len <= 32 or element_bytes == 4 else 64


def prune_configs(configs: Sequence[triton.Config], facts_of: Callable[[triton.Config], KernelFacts],
                  limits: SMLimits) -> List[triton.Config]:
    """The configs whose compiled kernel (facts_of) spills nothing and fits one SM of `limits`."""
    kept = [config for config in configs if facts_of(config).fits(limits)]
    if not kept:
        raise RuntimeError(f"every Triton configuration spills or exceeds shared memory here: {configs}")
    return kept


@dataclass(frozen=True)
class KernelFacts:
    """Resources of one compiled kernel: registers and spilled bytes per thread, shared bytes per CTA, threads."""

    registers: int
    spill_bytes: int
    shared_bytes: int
    threads: int

    def fits(self, limits: Union[int, SMLimits]) -> bool:
        """No spills, and one CTA fits an SM of sm_<limits> (or of SMLimits)."""
        return fits_without_spills(self.registers, self.spill_bytes, self.shared_bytes, self.threads, limits)

    def ctas_per_sm(self, limits: Union[int, SMLimits]) -> int:
        return ctas_per_sm(self.registers, self.shared_bytes, self.threads, limits)


def compiled_facts(kernel, args: Sequence, meta: dict) -> KernelFacts:
    """KernelFacts of `kernel` compiled by the JIT for the current CUDA device with these arguments (GPU only;
    Triton reports local memory in 4-byte words as n_spills)."""
    compiled = kernel.warmup(*args, grid=(1,), **meta)
    compiled._init_handles()
    return KernelFacts(compiled.n_regs, 4 * compiled.n_spills, compiled.metadata.shared,
                       compiled.metadata.num_warps * 32)


def _prune_forward(configs, named_args, **kwargs):
    """early_config_prune of the tuned forward: this element size's candidates that fit the device."""
    q = named_args["Q"]
    args = list(named_args.values())
    wanted = FORWARD_CANDIDATES[q.element_size()]
    candidates = [config for config in configs if _candidate(config) in wanted]
    facts_of = lambda config: compiled_facts(_forward_kernel, args, {**kwargs, **config_meta(config)})
    return prune_configs(candidates, facts_of, device_limits(q.device))


_tuned_forward_kernel = triton.autotune(
    configs=FORWARD_CONFIGS,
    key=["NUM_SOURCES", "BLOCK_M", "BLOCK_D", "keys_bucket", "HAS_P0", "HAS_P1", "HAS_P2", "HAS_P3"],
    prune_configs_by={"early_config_prune": _prune_forward},
)(_forward_kernel)


def _forward_launcher():
    """(kernel, meta): the autotuned kernel and {} on a GPU; the plain kernel and None (_untuned_config)
    under the CPU interpreter (tuning there is meaningless) or with MPLUG_KERNELS_TRITON_AUTOTUNE=0."""
    if interpreter_on() or os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return _forward_kernel, None
    return _tuned_forward_kernel, {}


# ---------------------------------------------------------------- launches

@dataclass
class Launch:
    """One kernel launch: the @triton.jit kernel, grid, positional arguments and keyword (constexpr, warps,
    stages) arguments; `tuned` launches take their BLOCK_N/warps/stages from the autotuner or _untuned_config."""

    kernel: object
    grid: Tuple[int, ...]
    args: tuple
    meta: dict
    tuned: bool = False

    def run(self) -> None:
        if not self.tuned:
            self.kernel[self.grid](*self.args, **self.meta)
            return
        kernel, tuning = _forward_launcher()
        tuning = config_meta(_untuned_config(self)) if tuning is None else tuning
        kernel[self.grid](*self.args, **self.meta, **tuning)


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides3(x: torch.Tensor) -> Tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def _source_args(ks, vs, masks) -> Tuple[list, list, list, list]:
    pointers, strides, has_mask, lengths = [], [], [], []
    for i in range(MAX_SOURCES):
        j = min(i, len(ks) - 1)
        k, v, mask = ks[j], vs[j], masks[j]
        pointers += [k, v, mask if mask is not None else k]
        strides += [*_strides3(k), *_strides3(v), mask.stride(0) if mask is not None else 0]
        has_mask.append(mask is not None and i < len(ks))
        lengths.append(k.shape[1] if i < len(ks) else 0)
    return pointers, strides, has_mask, lengths


def _position_args(positions: Optional[Positions]) -> Tuple[list, list, list]:
    """([P0..P3, QPOS], their batch strides, which of the four source slots have key positions); None for what
    is missing, so the JIT drops it from the kernel's parameters (a launch without positions compiles as before)."""
    keys = positions.keys if positions is not None else ()
    present = [keys[i] if i < len(keys) else None for i in range(MAX_SOURCES)]
    present.append(positions.queries if positions is not None else None)
    strides = [p.stride(0) if p is not None else None for p in present]
    return present, strides, [p is not None for p in present[:MAX_SOURCES]]


def _contiguous_positions(positions: Optional[Positions]) -> Optional[Positions]:
    """Positions with a contiguous last dim (a copy only of those strided there)."""
    if positions is None:
        return None
    fix = lambda p: p if p is None or p.stride(-1) == 1 else p.contiguous()
    return Positions(tuple(fix(p) for p in positions.keys), fix(positions.queries))


def forward_launches(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]],
    softmax_scale: float, out: torch.Tensor, lse: torch.Tensor, plan: Tuple[int, int],
    positions: Optional[Positions] = None,
) -> List[Launch]:
    """The forward kernel (tuned) and, with several splits, the combine kernel writing out/lse; q, ks, vs with
    a contiguous last dim, masks as mask_bytes, positions (or None) contiguous; plan (num_splits, split_size)
    from split_keys or split_plan (the last split holds every key left). Partial-output buffers are allocated here."""
    batch, q_len, heads, head_dim = q.shape
    block_m, block_d = _block_m(q_len, q.element_size()), _block_d(head_dim)
    num_splits, split_size = plan
    split = num_splits > 1
    f32 = dict(dtype=torch.float32, device=q.device)
    part_out = torch.empty((num_splits, batch * heads, q_len, block_d), **f32) if split else lse
    part_lse = torch.empty((num_splits, batch * heads, q_len), **f32) if split else lse
    pointers, strides, has_mask, lengths = _source_args(ks, vs, masks)
    position_pointers, position_strides, has_pos = _position_args(positions)
    forward = Launch(
        _forward_kernel, (triton.cdiv(q_len, block_m), batch * heads, num_splits),
        (q, out, lse, part_out, part_lse, *pointers, *position_pointers, *_strides3(q), *_strides3(out), *strides,
         *lengths, *position_strides, heads, heads // ks[0].shape[2], q_len, head_dim, split_size, num_splits,
         softmax_scale * LOG2E, triton.next_power_of_2(triton.cdiv(split_size, 64))),
        dict(NUM_SOURCES=len(ks), HAS_M0=has_mask[0], HAS_M1=has_mask[1], HAS_M2=has_mask[2], HAS_M3=has_mask[3],
             HAS_P0=has_pos[0], HAS_P1=has_pos[1], HAS_P2=has_pos[2], HAS_P3=has_pos[3],
             PRECISION=_precision(q.dtype), BLOCK_M=block_m, BLOCK_D=block_d),
        tuned=True,
    )
    if not split:
        return [forward]
    combine = Launch(
        _combine_kernel, (batch * heads * q_len,),
        (part_out, part_lse, out, lse, *_strides3(out), heads, q_len, head_dim, batch * heads, num_splits),
        dict(SPLITS_POW2=max(2, triton.next_power_of_2(num_splits)), BLOCK_D=block_d, **COMBINE_META),
    )
    return [forward, combine]


def _untuned_config(launch: Launch) -> triton.Config:
    """The forward configuration run without tuning: the first candidate that fits the GPU (the first one
    under the CPU interpreter, where nothing is compiled)."""
    q = launch.args[0]
    candidates = forward_candidates(q.element_size())
    if q.device.type != "cuda":
        return candidates[0]
    return _prune_forward(candidates, dict(zip(_forward_kernel.arg_names, launch.args)), **launch.meta)[0]


def _multiprocessor_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


_forward_occupancy: Dict[tuple, int] = {}


def _forward_ctas_per_sm(launch: Launch) -> int:
    """CTAs per SM of the unsplit forward in its untuned configuration, compiled for the current GPU."""
    q = launch.args[0]
    key = (q.device, q.dtype, tuple(sorted(launch.meta.items())))
    if key not in _forward_occupancy:
        meta = {**launch.meta, **config_meta(_untuned_config(launch))}
        facts = compiled_facts(launch.kernel, launch.args, meta)
        _forward_occupancy[key] = max(1, facts.ctas_per_sm(device_limits(q.device)))
    return _forward_occupancy[key]


def choose_split_plan(unsplit: Launch, total_keys: int) -> Tuple[int, int]:
    """(num_splits, split_size) of a forward launch (q [B, Lq, H, D] its first argument): the forced count's
    key ranges (split_keys), else occupancy.split_plan with the kernel's CTAs per SM compiled for the GPU
    (fixed INTERPRETER_* values on the CPU)."""
    if forced_num_splits() is not None:
        return split_keys(total_keys, forced_num_splits(), SPLIT_KEYS)
    q = unsplit.args[0]
    batch, q_len, heads, head_dim = q.shape
    shape = (batch, heads, q_len, total_keys, head_dim, q.element_size())
    if q.device.type != "cuda":
        return split_plan(*shape, backend="triton", sm_count=INTERPRETER_SM_COUNT, ctas_per_sm=INTERPRETER_CTAS_PER_SM)
    major, minor = torch.cuda.get_device_capability(q.device)
    return split_plan(*shape, backend="triton", arch=10 * major + minor, sm_count=_multiprocessor_count(q.device),
                      ctas_per_sm=_forward_ctas_per_sm(unsplit))


def forward(
    q: torch.Tensor, ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor],
    masks: Sequence[Optional[torch.Tensor]], softmax_scale: float, positions: Optional[Positions] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """out [B, Lq, H, D] and lse float32 [B, H, Lq] of q over the concatenated sources (visible under positions,
    or all), no copies; a query that sees no key gets zeros and lse -inf."""
    if len(ks) > MAX_SOURCES:
        raise ValueError(f"at most {MAX_SOURCES} key/value sources, got {len(ks)}")
    q = _last_dim_contiguous(q)
    ks = [_last_dim_contiguous(k) for k in ks]
    vs = [_last_dim_contiguous(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    positions = _contiguous_positions(positions)
    batch, q_len, heads, _ = q.shape
    out = q.new_empty(q.shape)
    lse = torch.empty((batch, heads, q_len), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    total_keys = sum(k.shape[1] for k in ks)
    whole = split_keys(total_keys, 1, SPLIT_KEYS)
    unsplit = forward_launches(q, ks, vs, masks, softmax_scale, out, lse, whole, positions)[0]
    plan = choose_split_plan(unsplit, total_keys)
    for launch in forward_launches(q, ks, vs, masks, softmax_scale, out, lse, plan, positions):
        launch.run()
    return out, lse


def backward_launches(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor, lse: torch.Tensor,
    softmax_scale: float, deterministic: bool, dq_acc: torch.Tensor, dks: Sequence[torch.Tensor],
    dvs: Sequence[torch.Tensor], positions: Optional[Positions] = None,
) -> List[Launch]:
    """delta, then per source dK/dV (dQ by atomics into dq_acc) or dK/dV and the deterministic dQ kernel;
    inputs with a contiguous last dim, masks as mask_bytes, positions (or None) contiguous, lse contiguous;
    allocates delta."""
    batch, q_len, heads, head_dim = q.shape
    delta = torch.empty((batch * heads, q_len), dtype=torch.float32, device=q.device)
    block_d = _block_d(head_dim)
    lse_strides = (dlse.stride(0), dlse.stride(1), dlse.stride(2)) if dlse is not None else (0, 0, 0)
    launches = [Launch(
        _delta_kernel, (triton.cdiv(q_len, DELTA_META["BLOCK_M"]), batch * heads),
        (out, dout, dlse if dlse is not None else delta, delta, *_strides3(out), *_strides3(dout), *lse_strides,
         heads, q_len, head_dim),
        dict(HAS_DLSE=dlse is not None, BLOCK_D=block_d, **DELTA_META),
    )]
    meta = dict(PRECISION=_precision(q.dtype), **backward_meta(q.element_size(), head_dim, q_len))
    common = (*_strides3(q), *_strides3(dout))
    kv_heads = ks[0].shape[2]  # grouped heads: dK/dV programs per K/V head, each summing its group
    position_pointers, position_strides, has_pos = _position_args(positions)
    dkdv_meta = meta if positions is None else {**meta, "BLOCK_M": min(meta["BLOCK_M"], POSITIONS_DKDV_MAX_BLOCK_M)}
    for i, (k, v, mask, dk, dv) in enumerate(zip(ks, vs, masks, dks, dvs)):
        source = (*_strides3(k), *_strides3(v), mask.stride(0) if mask is not None else 0, position_strides[i],
                  position_strides[-1])
        inputs = (k, v, mask if mask is not None else k, position_pointers[i], position_pointers[-1])
        shape = (heads, heads // kv_heads, q_len, k.shape[1], head_dim, softmax_scale)
        flags = dict(HAS_MASK=mask is not None, HAS_POS=has_pos[i])
        launches.append(Launch(
            _dkdv_kernel, (triton.cdiv(k.shape[1], meta["BLOCK_N"]), batch * kv_heads),
            (q, dout, *inputs, lse, delta, dk, dv, dq_acc, *common, *source, *_strides3(dk), *_strides3(dv),
             *_strides3(dq_acc), *shape),
            dict(**flags, ZERO_DEAD=positions is not None, ATOMIC_DQ=not deterministic, **dkdv_meta),
        ))
        if deterministic:
            launches.append(Launch(
                _dq_kernel, (triton.cdiv(q_len, meta["BLOCK_M"]), batch * heads),
                (q, dout, *inputs, lse, delta, dq_acc, *common, *source, *_strides3(dq_acc), *shape),
                dict(**flags, **meta),
            ))
    return launches


def backward(
    dout: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, ks: Sequence[torch.Tensor],
    vs: Sequence[torch.Tensor], masks: Sequence[Optional[torch.Tensor]], out: torch.Tensor,
    lse: torch.Tensor, softmax_scale: float, deterministic: bool, positions: Optional[Positions] = None,
) -> Tuple[torch.Tensor, List[torch.Tensor], List[torch.Tensor]]:
    """(dq, dks, dvs) of forward's inputs (positions as given to it); deterministic=True computes dQ without
    atomics."""
    q, dout, out = _last_dim_contiguous(q), _last_dim_contiguous(dout), _last_dim_contiguous(out)
    ks = [_last_dim_contiguous(k) for k in ks]
    vs = [_last_dim_contiguous(v) for v in vs]
    masks = [mask_bytes(m) for m in masks]
    positions = _contiguous_positions(positions)
    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return q.new_zeros(q.shape), [k.new_zeros(k.shape) for k in ks], [v.new_zeros(v.shape) for v in vs]
    dks = [k.new_empty(k.shape) for k in ks]
    dvs = [v.new_empty(v.shape) for v in vs]
    for launch in backward_launches(dout, dlse, q, ks, vs, masks, out, lse.contiguous(), softmax_scale,
                                    deterministic, dq_acc, dks, dvs, positions):
        launch.run()
    return dq_acc.to(q.dtype), dks, dvs
