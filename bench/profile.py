"""Profile one mPLUG training step and one VQA generation with named ranges around every fusion layer,
attention call and decoder step.

``python -m bench.profile``: under ``nsys profile`` (NVTX ranges) when nsys is on PATH, otherwise
torch.profiler, writing a Chrome trace (open it in chrome://tracing or https://ui.perfetto.dev).
``--torch-profiler`` forces the latter; ``--config tiny`` profiles the few-MB model.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench import model_bench
from bench.common import bench_dtype, default_device, new_run_dir
from bench.fusion import CONFIGS
from mplug_kernels import profiling

# The model already opens ranges per fusion layer, attention call and decoder step; add its three big blocks.
RANGED_MODULES = r"visual_encoder|text_encoder|text_decoder"
INNER_FLAG = "--inside-nsys"


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="base")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: a new bench/out/<UTC date-time>/profile/ for every run)")
    parser.add_argument("--torch-profiler", action="store_true", help="use torch.profiler even when nsys exists")
    parser.add_argument(INNER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.out = args.out or new_run_dir() / "profile"
    return args


def profiled_model(config_name: str, batch: int, device: torch.device):
    """(model with ranges on its encoders and decoder, inputs); fusion layers, attention calls and decoder steps have their own."""
    config = CONFIGS[config_name](dropout=0.0)
    dtype = bench_dtype(device)
    model = model_bench.build_model(config, device, dtype)
    profiling.add_module_ranges(model, RANGED_MODULES)
    return model, model_bench.make_batch(config, batch, device, dtype)


def workload(model, inputs) -> None:
    """One training step and one VQA generation (KV cache on), each inside its own range."""
    with profiling.nvtx_range("train_step"):
        model_bench.train_step_function(model, inputs)()
    with profiling.nvtx_range("vqa_generate"):
        model_bench.generate_function(model, inputs, use_cache=True)()
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def warm_then_profile(model, inputs, profile_context) -> None:
    """Run the workload once with ranges off (warm-up, kernel compilation), then inside profile_context with them on."""
    profiling.enable_nvtx(False)
    workload(model, inputs)
    profiling.enable_nvtx()
    with profile_context:
        workload(model, inputs)
    profiling.enable_nvtx(False)


def run_torch_profiler(args, device: torch.device) -> Path:
    """Profile the warm workload with torch.profiler and write a Chrome trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    profiler = torch.profiler.profile(activities=activities)
    warm_then_profile(*profiled_model(args.config, args.batch, device), profiler)
    args.out.mkdir(parents=True, exist_ok=True)
    trace = args.out / f"mplug_{args.config}_{device.type}.trace.json"
    profiler.export_chrome_trace(str(trace))
    sort_key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_key, row_limit=15))
    return trace


def run_under_nsys(args, nsys: str) -> Path:
    """Re-run this module under nsys profile with the NVTX ranges on; returns the .nsys-rep path."""
    args.out.mkdir(parents=True, exist_ok=True)
    report = args.out / f"mplug_{args.config}"
    command = [
        nsys, "profile", "--trace=cuda,nvtx,osrt", "--force-overwrite=true", f"--output={report}",
        sys.executable, "-m", "bench.profile", INNER_FLAG, "--config", args.config, "--batch", str(args.batch),
    ]
    subprocess.run(command, check=True)
    return report.with_suffix(".nsys-rep")


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Profile and print where the profile file went."""
    args = parse_args(argv)
    device = default_device()
    if args.inside_nsys:
        warm_then_profile(*profiled_model(args.config, args.batch, device), profiling.nvtx_range("profiled"))
        return 0
    nsys = shutil.which("nsys")
    if nsys and not args.torch_profiler:
        path = run_under_nsys(args, nsys)
        print(f"wrote {path} (open with nsys-ui, or: nsys stats {path})")
    else:
        path = run_torch_profiler(args, device)
        print(f"wrote {path} (open in chrome://tracing or https://ui.perfetto.dev)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
