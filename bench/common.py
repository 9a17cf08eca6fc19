"""What every benchmark shares: timing, peak memory, the environment record and the JSON writer."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "out"
SLOW_CALL_S = 1.0


def default_device() -> torch.device:
    """cuda when a GPU exists, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def bench_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU; float32 on the CPU, where bfloat16 attention is not what anyone runs."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def time_ms(fn: Callable[[], object], device: torch.device, min_run_time: float = 0.2, warmed: bool = False) -> float:
    """Median wall time of fn in milliseconds: triton.testing.do_bench on a GPU, torch.utils.benchmark on the CPU.

    On the CPU the first call warms up; when it took longer than min_run_time one more call is timed. With
    warmed=True (the caller already ran the same module once, so one-time costs are paid) a first call longer
    than SLOW_CALL_S is itself the measurement.
    """
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    from torch.utils import benchmark

    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if warmed and first > SLOW_CALL_S:
        return first * 1e3
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn})
    if first > min_run_time:
        return timer.timeit(number=1).median * 1e3
    return timer.blocked_autorange(min_run_time=min_run_time).median * 1e3


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Peak device memory (MiB) allocated while fn runs, above what was allocated before; None on the CPU."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def measured_bandwidth_gbs(device: torch.device, nbytes: int = 1 << 30) -> Optional[float]:
    """Device-to-device copy bandwidth in GB/s (read + write counted), the '100%' for memory-bound kernels."""
    if device.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


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


def environment(device: torch.device) -> Dict[str, object]:
    """Device name, versions, commit, date, command, CPU threads and load average: stored with every result."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "cpu_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def write_results(name: str, device: torch.device, rows: List[dict], out_dir: Optional[Path] = None, **extra) -> Path:
    """Write {'environment': ..., 'rows': rows, **extra} as JSON to out_dir/name.json and return the path."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"environment": environment(device), **extra, "rows": rows}
    path.write_text(json.dumps(payload, indent=2))
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


def benchmark_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser holding the flags every benchmark CLI shares: --json-dir, --quick, --backends, --min-run-time, --threads."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    parser.add_argument("--json-dir", type=Path, default=None, help=f"where JSON and PNG go (default {RESULTS_DIR})")
    parser.add_argument("--quick", action="store_true", help=f"tiny grid for a smoke run (also env {QUICK_ENV_VAR}=1)")
    parser.add_argument("--backends", nargs="+", default=None, help="only these backends (default: every available)")
    parser.add_argument("--min-run-time", type=float, default=0.2, help="CPU timing: seconds per measurement")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    return parser


def parse_benchmark_args(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse argv, then act on the shared flags that change the process (--threads)."""
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def kernel_benchmark_cli(module: str, doc: str, grids: Grids, argv: Optional[Sequence[str]]):
    """A kernel benchmark's command line: (args, device, the grid chosen for that device)."""
    args = parse_benchmark_args(benchmark_parser(f"python -m {module}", doc), argv)
    device = default_device()
    return args, device, grids.select(device, args.quick)


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
