"""Kernel benchmark of co_attention: forward, backward and forward+backward for every available backend.

``python -m bench.bench_co_attention [--json-dir DIR] [--quick] [--backends triton sdpa ...]``
Reports ms, TFLOP/s, GB/s and the fraction of the measured HBM copy bandwidth (q, k, v, out bytes counted
once for the forward) over B in {1, 8, 64}, H = 12, D = 64, Lq in {25, 64}, Lk in {257, 577, 1025}, bfloat16
on a GPU; on the CPU the same grid scaled down in float32.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import asdict, dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import (
    Grids,
    TimingPolicy,
    bench_dtype,
    fastest_per_round,
    kernel_benchmark_cli,
    measure,
    measured_bandwidth_gbs,
    paired_ratio,
    progress,
    write_results,
)
from mplug_kernels import co_attention
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.triton import interpreter_on

GRIDS = Grids(
    quick={"batch": (1,), "q_len": (25,), "k_len": (257,)},
    gpu={"batch": (1, 8, 64), "q_len": (25, 64), "k_len": (257, 577, 1025)},
    cpu={"batch": (1, 2), "q_len": (25, 64), "k_len": (257, 577)},
)
HEADS = 12
HEAD_DIM = 64
PASSES = ("fwd", "bwd", "fwd_bwd")
SDPA_KERNELS = {"flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION", "math": "MATH"}


@dataclass(frozen=True)
class Shape:
    """One co-attention problem: batch, heads, head dim, query and key lengths."""

    batch: int
    heads: int
    head_dim: int
    q_len: int
    k_len: int

    def label(self) -> str:
        return f"B={self.batch} H={self.heads} D={self.head_dim} Lq={self.q_len} Lk={self.k_len}"

    def flops(self, pass_name: str) -> int:
        """Matmul FLOPs: forward 2 GEMMs (QK^T, PV); backward 5 (recomputed QK^T, dP, dV, dQ, dK)."""
        forward = 4 * self.batch * self.heads * self.q_len * self.k_len * self.head_dim
        return {"fwd": forward, "bwd": forward * 5 // 2, "fwd_bwd": forward * 7 // 2}[pass_name]

    def bytes_moved(self, pass_name: str, element_size: int) -> int:
        """Compulsory HBM bytes: forward q, k, v, out once; backward q, k, v, out, dout read and dq, dk, dv written."""
        row = self.batch * self.heads * self.head_dim * element_size
        forward = row * (2 * self.q_len + 2 * self.k_len)
        backward = row * (4 * self.q_len + 4 * self.k_len)
        return {"fwd": forward, "bwd": backward, "fwd_bwd": forward + backward}[pass_name]


@dataclass
class Runner:
    """A named way to run co-attention: the call and the context it must run inside."""

    name: str
    attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    context: Callable[[], ContextManager] = contextlib.nullcontext


def grid_shapes(grid: Dict[str, Sequence[int]]) -> List[Shape]:
    """Every Shape of the grid, H = 12 and D = 64."""
    return [
        Shape(batch, HEADS, HEAD_DIM, q_len, k_len)
        for batch, q_len, k_len in itertools.product(grid["batch"], grid["q_len"], grid["k_len"])
    ]


def _registry_runner(name: str) -> Runner:
    return Runner(name, lambda q, k, v: co_attention(q, k, v, backend=name))


def _sdpa_kernel_runner(kernel: str) -> Runner:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, SDPA_KERNELS[kernel])
    return Runner(f"sdpa[{kernel}]", lambda q, k, v: co_attention(q, k, v, backend="sdpa"), lambda: sdpa_kernel(backend))


def available_runners(
    device: torch.device, dtype: torch.dtype, requested: Optional[Sequence[str]] = None
) -> Tuple[List[Runner], Dict[str, str]]:
    """(runners to time, {skipped backend: why}): every registered backend that can run, SDPA split per kernel on GPU."""
    call = AttentionCall(device.type, dtype, HEAD_DIM, 1, False, True, False)
    runners: List[Runner] = []
    skipped: Dict[str, str] = {}
    for name, backend in BACKENDS.items():
        reasons = backend.reasons(call)
        if name == "triton" and device.type == "cpu" and interpreter_on() and not requested:
            reasons = ["TRITON_INTERPRET=1 emulates the kernel on the CPU: not a performance measurement"]
        if reasons:
            skipped[name] = "; ".join(reasons)
        elif name == "sdpa" and device.type == "cuda":
            runners.extend(_sdpa_kernel_runner(kernel) for kernel in SDPA_KERNELS)
        else:
            runners.append(_registry_runner(name))
    if requested:
        runners = [r for r in runners if r.name in requested or r.name.split("[")[0] in requested]
    return runners, skipped


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, requires_grad: bool = False):
    """Random q [B, Lq, H, D], k, v [B, Lk, H, D]."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def tensor(length: int) -> torch.Tensor:
        values = torch.randn(shape.batch, length, shape.heads, shape.head_dim, generator=generator)
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return tensor(shape.q_len), tensor(shape.k_len), tensor(shape.k_len)


def pass_functions(runner: Runner, shape: Shape, dtype: torch.dtype, device: torch.device) -> Dict[str, Callable[[], object]]:
    """{'fwd', 'bwd', 'fwd_bwd'}: zero-argument callables, inputs allocated once (call inside runner.context())."""
    q, k, v = make_inputs(shape, dtype, device)
    q_grad, k_grad, v_grad = make_inputs(shape, dtype, device, requires_grad=True)
    inputs = (q_grad, k_grad, v_grad)
    with runner.context():
        out = runner.attend(*inputs)
    dout = torch.randn_like(out)

    def forward():
        with torch.no_grad():
            return runner.attend(q, k, v)

    def backward():
        return torch.autograd.grad(out, inputs, dout, retain_graph=True)

    def forward_backward():
        return torch.autograd.grad(runner.attend(*inputs), inputs, dout)

    return {"fwd": forward, "bwd": backward, "fwd_bwd": forward_backward}


def derived_metrics(shape: Shape, pass_name: str, ms: float, element_size: int, bandwidth_gbs: Optional[float]) -> dict:
    """TFLOP/s, GB/s and the fraction of the measured HBM bandwidth at a median time of ms."""
    gbs = shape.bytes_moved(pass_name, element_size) / (ms * 1e-3) / 1e9
    return {
        "tflops": shape.flops(pass_name) / (ms * 1e-3) / 1e12,
        "gbs": gbs,
        "hbm_fraction": gbs / bandwidth_gbs if bandwidth_gbs else None,
    }


def _in_context(runner: Runner, function: Callable[[], object]) -> Callable[[], object]:
    def run():
        with runner.context():
            return function()

    return run


def time_runners(
    runners: Sequence[Runner],
    functions_of: Callable[[Runner], Dict[str, Callable[[], object]]],
    base_row: dict,
    metrics_shape: Shape,
    dtype: torch.dtype,
    device: torch.device,
    bandwidth_gbs: Optional[float],
    policy: TimingPolicy,
    passes: Sequence[str] = PASSES,
) -> Tuple[List[dict], List[dict]]:
    """(rows, ratio rows) of one shape: every runner x pass timed interleaved; each runner / the fastest SDPA kernel
    of the same round (per pass). A runner that cannot build its inputs gets error rows."""
    functions, errors = {}, {}
    for runner in runners:
        try:
            with runner.context():
                functions_of_runner = functions_of(runner)
        except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as error:
            errors[runner.name] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
            continue
        functions.update({(runner.name, name): _in_context(runner, functions_of_runner[name]) for name in passes})
    timings = measure(functions, device, policy)
    element_size = torch.empty((), dtype=dtype).element_size()
    rows, ratios = [], []
    for runner, pass_name in itertools.product(runners, passes):
        row = {**base_row, "backend": runner.name, "pass": pass_name}
        timing = timings.get((runner.name, pass_name))
        if timing is None or timing.error is not None:
            rows.append(row | {"error": errors.get(runner.name) or timing.error})
            continue
        rows.append(row | timing.row() | derived_metrics(metrics_shape, pass_name, timing.median, element_size, bandwidth_gbs))
    for pass_name in passes:
        best_sdpa = fastest_per_round([t for (name, p), t in timings.items() if p == pass_name and name.startswith("sdpa")])
        for (name, p), timing in timings.items():
            ratio = paired_ratio(timing, best_sdpa) if best_sdpa and p == pass_name and not name.startswith("sdpa") else None
            if ratio is not None:
                ratios.append({**base_row, "ratio": f"{name}/best sdpa", "backend": name, "pass": pass_name, **ratio.row()})
    return rows, ratios


def run(
    device: torch.device,
    grid: Dict[str, Sequence[int]],
    policy: TimingPolicy,
    backends: Optional[Sequence[str]] = None,
) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields) for every shape of the grid and every available backend."""
    dtype = bench_dtype(device)
    runners, skipped = available_runners(device, dtype, backends)
    bandwidth = measured_bandwidth_gbs(device)
    rows, ratios = [], []
    for shape in progress(grid_shapes(grid), "co_attention"):
        base = {"op": "co_attention", "dtype": str(dtype).replace("torch.", ""), **asdict(shape)}
        shape_rows, shape_ratios = time_runners(
            runners, lambda runner: pass_functions(runner, shape, dtype, device), base, shape, dtype, device, bandwidth, policy)
        rows += shape_rows
        ratios += shape_ratios
    extra = {
        "benchmark": "co_attention",
        "grid": {key: list(values) for key, values in grid.items()} | {"heads": HEADS, "head_dim": HEAD_DIM},
        "dtype": str(dtype).replace("torch.", ""),
        "resolved_backends": [runner.name for runner in runners],
        "hbm_bandwidth_gbs": bandwidth,
        "skipped_backends": skipped,
        "counting": {
            "flops": "fwd 4*B*H*Lq*Lk*D (QK^T, PV); bwd 2.5x fwd (five GEMMs)",
            "bytes": "fwd q, k, v, out once; bwd q, k, v, out, dout, dq, dk, dv once",
            "hbm_fraction": "GB/s over the measured device-to-device copy bandwidth",
            "derived": "TFLOP/s, GB/s and % HBM at the median time",
        },
    }
    return rows, ratios, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: run the grid, write co_attention.json and co_attention.png, print the table."""
    from bench import report

    args, device, grid, run_record = kernel_benchmark_cli("bench.bench_co_attention", __doc__, GRIDS, argv)
    rows, ratios, extra = run(device, grid, run_record.policy, args.backends)
    path = write_results("co_attention", run_record, rows, args.json_dir, ratios, **extra)
    payload = report.load(path)
    report.plot_kernel(payload, path.with_suffix(".png"))
    print(report.kernel_table(payload))
    print(f"\nwrote {path} and {path.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
