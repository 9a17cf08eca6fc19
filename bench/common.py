"""What every benchmark shares: the timing method, the environment record and the JSON writer.

The timing method (``measure``), used by every benchmark, the pytest-benchmark suites included:
- every function of one comparison is warmed up by one profiled call (its peak memory and the attention
  backends that ran), then by ``warmup - 1`` plain calls;
- then the functions are timed round-robin, one sample each per round, the order rotated every round, so a
  noisy stretch of the machine hits all of them alike; rounds go on until every function has
  ``min_repeats`` samples and either the cell budget (``budget_s`` per function) is spent or every spread
  (max - min over median) is within ``target_spread``, at most ``max_repeats`` rounds;
- GPU: one call per sample timed by CUDA events, the L2 cache flushed before each; peak memory from
  ``torch.cuda.max_memory_allocated``. CPU: wall time of enough calls to fill ``MIN_CPU_SAMPLE_S``; peak memory
  from the torch CPU allocator's events recorded by torch.profiler (the CPU analogue of max_memory_allocated);
- ratios (``paired_ratio``) are computed per round from the paired samples and reported as median, min, max;
- a cell or ratio whose spread exceeds ``NOISY_SPREAD`` of its median is marked noisy.

Minimal use (helpers of other benchmarks)::

    timings = measure({"ours": fn_a, "sdpa": fn_b}, device, TimingPolicy.for_device(device))
    row = {"backend": "ours", **timings["ours"].row()}          # ms_median, ms_min, ms_max, repeats, noisy, ...
    ratio = paired_ratio(timings["ours"], timings["sdpa"]).row()  # ratio_median, ratio_low, ratio_high, repeats
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional, Sequence, Tuple

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "out"
NOISY_SPREAD = 0.20
MIN_CPU_SAMPLE_S = 0.01
L2_FLUSH_BYTES = 256 * 2**20
ATTENTION_RANGE_PREFIX = "attention."
TIMING_METHOD = (
    "per cell: one profiled warm-up call (peak memory, attention backends), then round-robin samples of every "
    "function of the comparison, order rotated each round, until min_repeats and (cell budget spent or spread "
    "<= target_spread); GPU: CUDA events, L2 flushed before each sample; CPU: wall time. ms_* are per call; "
    f"ratios are per round from paired samples (median, min, max); noisy = (max - min) / median > {NOISY_SPREAD}"
)
PEAK_MEMORY_METHOD = {
    "cuda": "torch.cuda.max_memory_allocated during one call, minus what was allocated before",
    "cpu": "peak of torch CPU allocations during one call (torch.profiler memory events), minus frees of older tensors",
}


def new_run_dir(root: Path = RESULTS_DIR) -> Path:
    """A folder for one run's results that no earlier run used: root/<UTC date-time>[-N] (created by write_results)."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path, number = root / stamp, 1
    while path.exists():
        number += 1
        path = root / f"{stamp}-{number}"
    return path


def default_device() -> torch.device:
    """cuda when a GPU exists, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on the CPU, where bfloat16 attention is not what anyone runs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


@dataclass(frozen=True)
class TimingPolicy:
    """How long to time one cell: warm-up calls, bounds on the repeats, a time budget and a precision target."""

    warmup: int
    min_repeats: int
    max_repeats: int
    budget_s: float
    target_spread: float = 0.05

    @classmethod
    def for_device(cls, device: torch.device, budget_s: Optional[float] = None) -> "TimingPolicy":
        """GPU: 3 warm-ups, 5-200 repeats, 0.5 s per cell; CPU: 1 warm-up, 3-30 repeats, 0.2 s per cell."""
        if device.type == "cuda":
            return cls(warmup=3, min_repeats=5, max_repeats=200, budget_s=0.5 if budget_s is None else budget_s)
        return cls(warmup=1, min_repeats=3, max_repeats=30, budget_s=0.2 if budget_s is None else budget_s)

    def describe(self) -> Dict[str, float]:
        """The policy as JSON fields."""
        return {"warmup_calls": self.warmup, "min_repeats": self.min_repeats, "max_repeats": self.max_repeats,
                "budget_s_per_cell": self.budget_s, "target_spread": self.target_spread}


def _spread(values: Sequence[float]) -> float:
    middle = statistics.median(values)
    return (max(values) - min(values)) / middle if middle else math.inf


@dataclass
class Timing:
    """One cell: the ms per call of every repeat, the peak memory and attention backends of its profiled call."""

    samples_ms: List[float] = field(default_factory=list)
    peak_memory_mb: Optional[float] = None
    attention_backends: List[str] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def spread(self) -> float:
        return _spread(self.samples_ms)

    @property
    def noisy(self) -> bool:
        return self.spread > NOISY_SPREAD

    def row(self) -> Dict[str, Any]:
        """JSON fields: ms_median, ms_min, ms_max, repeats, noisy, spread, samples_ms (in round order), peak_memory_mb,
        attention_backends; or error."""
        if self.error is not None:
            return {"error": self.error}
        return {"ms_median": self.median, "ms_min": min(self.samples_ms), "ms_max": max(self.samples_ms),
                "repeats": len(self.samples_ms), "noisy": self.noisy, "spread": self.spread, "samples_ms": self.samples_ms,
                "peak_memory_mb": self.peak_memory_mb, "attention_backends": self.attention_backends}


@dataclass
class Ratio:
    """A ratio of two cells, one value per round of paired samples."""

    values: List[float]

    def row(self) -> Dict[str, Any]:
        """JSON fields: ratio_median, ratio_low, ratio_high (min and max over rounds), repeats, noisy."""
        return {"ratio_median": statistics.median(self.values), "ratio_low": min(self.values),
                "ratio_high": max(self.values), "repeats": len(self.values), "noisy": _spread(self.values) > NOISY_SPREAD}


def paired_ratio(numerator: Timing, denominator: Timing) -> Optional[Ratio]:
    """numerator / denominator per round (both from one ``measure`` call); None when either failed."""
    if numerator.error or denominator.error:
        return None
    return Ratio([a / b for a, b in zip(numerator.samples_ms, denominator.samples_ms)])


def fastest_per_round(timings: Sequence[Timing]) -> Optional[Timing]:
    """A pseudo-cell holding, per round, the fastest of timings (e.g. the best SDPA kernel); None when none ran."""
    ran = [timing for timing in timings if timing.error is None]
    if not ran:
        return None
    return Timing([min(samples) for samples in zip(*(timing.samples_ms for timing in ran))])


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"


def _cpu_peak_bytes(profiler) -> Optional[int]:
    """Peak of the running sum of CPU allocation (+) and free (-) events recorded by profiler, or None."""
    try:
        events = profiler.profiler.kineto_results.events()
    except AttributeError:
        return None
    changes = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    return max(itertools.accumulate((n for _, n in changes), initial=0))


def _ranges_seen(profiler) -> List[str]:
    names = {event.name for event in profiler.events() if event.name.startswith(ATTENTION_RANGE_PREFIX)}
    return sorted(name[len(ATTENTION_RANGE_PREFIX):] for name in names)


def profile_call(fn: Callable[[], object], device: torch.device) -> Tuple[Optional[float], List[str]]:
    """(peak memory MiB, attention backends that ran) of one call of fn, under torch.profiler with ranges on."""
    from mplug_kernels import profiling

    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # else the profiler logs every start and stop on stderr
    was_enabled = profiling.nvtx_enabled()
    profiling.enable_nvtx(True)
    on_gpu = device.type == "cuda"
    if on_gpu:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    try:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=not on_gpu) as profiler:
            fn()
            if on_gpu:
                torch.cuda.synchronize(device)
    finally:
        profiling.enable_nvtx(was_enabled)
    peak = torch.cuda.max_memory_allocated(device) - before if on_gpu else _cpu_peak_bytes(profiler)
    return (None if peak is None else peak / 2**20), _ranges_seen(profiler)


def calls_per_sample(fn: Callable[[], object], device: torch.device, first_call_s: float) -> int:
    """One on a GPU or after a first call over 1 s; else (timing one more call) enough to last MIN_CPU_SAMPLE_S."""
    if device.type == "cuda" or first_call_s > 1.0:
        return 1
    start = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - start
    return max(1, min(1000, math.ceil(MIN_CPU_SAMPLE_S / max(elapsed, 1e-9))))


class _Clock:
    """Times one sample of a function: CUDA events after an L2 flush on a GPU, wall time on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.on_gpu = device.type == "cuda"
        self.flush = flush_l2(device)
        self.calls: Dict[Hashable, int] = {}
        self.pending: List[Tuple[Hashable, Any, Any]] = []

    def calibrate(self, name: Hashable, fn: Callable[[], object], first_call_s: float) -> None:
        """Remember how many calls of fn make one sample."""
        self.calls[name] = calls_per_sample(fn, self.device, first_call_s)

    def sample(self, name: Hashable, fn: Callable[[], object], samples: Dict[Hashable, List[float]]) -> None:
        """Time fn once (GPU: queued, collected by finish_round) and append ms per call to samples[name]."""
        if self.on_gpu:
            self.flush()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            self.pending.append((name, start, end))
            return
        calls = self.calls[name]
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        samples[name].append((time.perf_counter() - begin) * 1e3 / calls)

    def finish_round(self, samples: Dict[Hashable, List[float]]) -> None:
        """Wait for the GPU and collect the queued samples."""
        if self.pending:
            torch.cuda.synchronize(self.device)
            for name, start, end in self.pending:
                samples[name].append(start.elapsed_time(end))
            self.pending.clear()


def _warm_up(name: Hashable, fn: Callable[[], object], device: torch.device, policy: TimingPolicy, clock: _Clock) -> Timing:
    """Profiled first call, the remaining warm-up calls and the clock's calibration; errors are recorded."""
    timing = Timing()
    try:
        start = time.perf_counter()
        timing.peak_memory_mb, timing.attention_backends = profile_call(fn, device)
        first_call_s = time.perf_counter() - start
        for _ in range(policy.warmup - 1):
            fn()
        clock.calibrate(name, fn, first_call_s)
    except (RuntimeError, ValueError, torch.cuda.OutOfMemoryError) as error:
        timing.error = _error_text(error)
    return timing


def _done(samples: Dict[Hashable, List[float]], rounds: int, elapsed_s: float, policy: TimingPolicy) -> bool:
    if rounds < policy.min_repeats:
        return False
    if rounds >= policy.max_repeats or elapsed_s >= policy.budget_s * len(samples):
        return True
    return all(_spread(values) <= policy.target_spread for values in samples.values())


def measure(functions: Mapping[Hashable, Callable[[], object]], device: torch.device, policy: TimingPolicy) -> Dict[Hashable, Timing]:
    """Time the functions of one comparison interleaved (see the module docstring); {name: Timing}."""
    clock = _Clock(device)
    timings = {name: _warm_up(name, fn, device, policy, clock) for name, fn in functions.items()}
    names = [name for name, timing in timings.items() if timing.error is None]
    samples: Dict[Hashable, List[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rounds in itertools.count(1):
        if not names:
            break
        shift = (rounds - 1) % len(names)
        for name in names[shift:] + names[:shift]:
            clock.sample(name, functions[name], samples)
        clock.finish_round(samples)
        if _done(samples, rounds, time.perf_counter() - start, policy):
            break
    for name in names:
        timings[name].samples_ms = samples[name]
    return timings


def measured_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s (read + write counted), the '100%' for memory-bound kernels."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = measure({"copy": lambda: dst.copy_(src)}, device, TimingPolicy.for_device(device))["copy"]
    return 2 * src.numel() / (timing.median * 1e-3) / 1e9


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _command() -> str:
    """How this process was started; bench scripts are shown as ``python -m bench[.module]``."""
    script = Path(sys.argv[0])
    if script.suffix == ".py" and script.resolve().parent == Path(__file__).resolve().parent:
        module = "bench" if script.stem == "__main__" else f"bench.{script.stem}"
        return " ".join(["python", "-m", module, *sys.argv[1:]])
    return " ".join([Path(sys.executable).name] + sys.argv)


def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def environment(device: torch.device) -> Dict[str, object]:
    """Device name and kind, versions, commit, date, command and CPU threads: stored with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    on_gpu = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "label": "GPU" if on_gpu else "CPU",
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "cpu_threads": torch.get_num_threads(),
    }


@dataclass
class Run:
    """What a benchmark's header needs from its start: the load average, the clocks and the commit at the start."""

    device: torch.device
    policy: TimingPolicy
    load_before: Optional[float] = field(default_factory=load_average)
    started: float = field(default_factory=time.perf_counter)
    started_cpu: float = field(default_factory=time.process_time)
    commit: str = field(default_factory=_git_commit)

    def header(self, rows: Sequence[dict], ratios: Sequence[dict]) -> Dict[str, object]:
        """The environment plus timing method, noisy-cell count, load average before and after, wall and CPU time."""
        cells = [row for row in rows if "ms_median" in row]
        return {
            **environment(self.device),
            "commit": self.commit,
            "timing": {"method": TIMING_METHOD, **self.policy.describe()},
            "peak_memory_method": PEAK_MEMORY_METHOD[self.device.type],
            "cells": len(cells),
            "noisy_cells": sum(row["noisy"] for row in cells),
            "noisy_ratios": sum(ratio["noisy"] for ratio in ratios),
            "load_average_before": self.load_before,
            "load_average_after": load_average(),
            "wall_s": time.perf_counter() - self.started,
            "process_cpu_s": time.process_time() - self.started_cpu,
        }


def write_results(name: str, run: Run, rows: List[dict], out_dir: Optional[Path] = None,
                  ratios: Sequence[dict] = (), **extra) -> Path:
    """Write {'environment': header, **extra, 'rows': rows, 'ratios': ratios} to out_dir/name.json through a temporary
    file and os.replace (a run killed mid-write leaves the previous file whole); returns the path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"environment": run.header(rows, ratios), **extra, "rows": rows, "ratios": list(ratios)}
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(payload, indent=2))
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
    return path


QUICK_ENV_VAR = "MPLUG_BENCH_QUICK"


def quick_mode() -> bool:
    """True when MPLUG_BENCH_QUICK=1: every benchmark shrinks to a tiny grid (smoke tests, CPU pytest runs)."""
    return os.environ.get(QUICK_ENV_VAR, "0") == "1"


@dataclass(frozen=True)
class Grids:
    """A benchmark's shape grids: ``quick`` (smoke runs), ``gpu`` (the full grid) and ``cpu`` (scaled down)."""

    quick: Any
    gpu: Any
    cpu: Any

    def select(self, device: torch.device, quick: bool = False):
        """The quick grid with --quick or MPLUG_BENCH_QUICK=1, else the GPU or the CPU grid for device."""
        if quick or quick_mode():
            return self.quick
        return self.gpu if device.type == "cuda" else self.cpu


def benchmark_parser(prog: str, doc: str, **helps: str) -> argparse.ArgumentParser:
    """A parser holding the flags every benchmark CLI shares: --json-dir, --quick, --backends, --budget, --threads
    (helps: a CLI's own help text for quick, backends or threads, where its defaults differ)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--json-dir", type=Path, default=None,
                        help=f"where JSON and PNG go (default: a new folder {RESULTS_DIR.relative_to(RESULTS_DIR.parent.parent)}/<UTC date-time>/ "
                             "for every run, so no run overwrites another)")
    parser.add_argument("--quick", action="store_true",
                        help=helps.get("quick", "tiny grid for a smoke run") + f" (also env {QUICK_ENV_VAR}=1)")
    parser.add_argument("--backends", nargs="+", default=None,
                        help=helps.get("backends", "only these backends (default: every available)"))
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per cell after the minimum "
                        "repeats (default 0.5 on a GPU, 0.2 on the CPU, 0 with --quick)")
    parser.add_argument("--threads", type=int, default=None,
                        help=helps.get("threads", "CPU threads for torch (default: torch's choice)"))
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]],
                         quick_threads: Optional[int] = None) -> argparse.Namespace:
    """Parse argv, then act on the shared flags that change the process (--threads); --quick sets --budget 0 (and
    --threads quick_threads when given); no --json-dir: a new folder under bench/out/ (new_run_dir)."""
    args = parser.parse_args(argv)
    args.json_dir = args.json_dir or new_run_dir()
    args.quick = args.quick or quick_mode()
    if args.quick and args.budget is None:
        args.budget = 0.0
    if args.quick and args.threads is None:
        args.threads = quick_threads
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def kernel_benchmark_cli(module: str, doc: str, grids: Grids, argv: Optional[Sequence[str]]):
    """A kernel benchmark's command line: (args, device, the grid chosen for that device, Run)."""
    args = parse_benchmark_args(benchmark_parser(f"python -m {module}", doc), argv)
    device = default_device()
    return args, device, grids.select(device, args.quick), Run(device, TimingPolicy.for_device(device, args.budget))


def progress(items, desc: str):
    """A tqdm progress bar over items (on stderr)."""
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, dynamic_ncols=True)


def synchronized(fn: Callable[[], object], device: torch.device) -> Callable[[], object]:
    """fn followed by a device synchronize, so wall-clock timers (pytest-benchmark) see the GPU work."""
    if device.type != "cuda":
        return fn

    def run():
        result = fn()
        torch.cuda.synchronize(device)
        return result

    return run


def flush_l2(device: torch.device) -> Callable[[], None]:
    """A setup callable that overwrites the GPU's L2 cache before a timed call (a no-op on the CPU)."""
    if device.type != "cuda":
        return lambda: None
    buffer = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    return lambda: buffer.zero_()
