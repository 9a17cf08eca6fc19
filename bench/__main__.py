"""``python -m bench``: the paper's efficiency claim on this machine, then what our kernels add.

Times mPLUG's fusion network in its three variants (skip, connected, two_way), Lt = 25, forward and training
step, on every available attention backend, then the full-model rows (training step, VQA generation, fused
vs eager). Every cell is timed by bench.common.measure (warm-up, interleaved repeats, paired ratios, spread).
- default on a GPU: the full grid (Lv 257, 577, 901, 1025) at batch 64 in bfloat16;
- default on the CPU: the cells that carry the claim (reference vs sdpa, batch 1, float32): the forward at Lv
  577 and 1025 and the training step at Lv 577, the three variants each, then the VQA-generation model row (batch
  1, image 224): under 5 minutes on 2 quiet cores. The training step at Lv 1025 and the full-model training step
  (tens of seconds a call) would take it past that: they are in --full;
- ``--full``: the whole grid on any device; ``--quick``: a smoke run of the tiny model (Lv 17, both passes, both
  model tasks, one torch thread unless --threads; about 30 s on 2 idle cores, longer on a busy machine).
On a CPU our Triton and CUDA kernels do not run: the rows time the fusion networks on PyTorch attention
(reference and sdpa), the cost of the architecture, not of our kernels; the output says so first.
Prints the expected duration, then the tables and a verdict; writes JSON + PNG into a new folder per run,
bench/out/<UTC date-time>/ (or --json-dir).
"""
from __future__ import annotations

import argparse
import itertools
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench import fusion, model_bench, report
from bench.fusion_report import verdict
from bench.common import Run, TimingPolicy, benchmark_parser, default_device, parse_benchmark_args, write_results

QUICK_VISION_LENS = (17,)
CPU_DEFAULT_VISION_LENS = (577, 1025)
CPU_DEFAULT_GROUPS = (("forward", 577), ("forward", 1025), ("train", 577))
CPU_DEFAULT_BACKENDS = ("reference", "sdpa")
CPU_DEFAULT_MODEL_TASKS = ("vqa_generate",)
CPU_DEFAULT_IMAGE_SIZE = 224
CPU_DEFAULT_MODEL_BATCH = 1
QUICK_THREADS = 1  # the tiny model's ops are too small to share between threads; a second one only adds contention
QUICK_EXPECTED = "about 25 s on 2 idle cores (measured: 24 s wall at load average 0.2; 45 s at load 8)"
OTHER_KERNEL_BENCHMARKS = ("bench_concat_attention", "bench_fusion_layers")


def parse_args(argv: Optional[Sequence[str]], device: torch.device) -> argparse.Namespace:
    parser = benchmark_parser(
        "python -m bench", __doc__,
        quick=f"smoke run of the tiny model, Lv {QUICK_VISION_LENS[0]}, both passes and model tasks: {QUICK_EXPECTED}",
        backends=f"only these backends (default: every available; {' and '.join(CPU_DEFAULT_BACKENDS)} in the CPU default run)",
        threads=f"CPU threads for torch (default: torch's choice; {QUICK_THREADS} with --quick)",
    )
    parser.add_argument("--full", action="store_true", help="the whole grid (the default on a GPU)")
    parser.add_argument("--config", choices=sorted(fusion.CONFIGS), default=None, help="model size (default base; tiny with --quick)")
    parser.add_argument("--batch", type=int, default=None, help=f"fusion batch (default {fusion.GPU_BATCH} on a GPU, {fusion.CPU_BATCH} on the CPU)")
    parser.add_argument("--model-batch", type=int, default=None, help=f"full-model batch (default {model_bench.GPU_BATCH} on a GPU; on the CPU {CPU_DEFAULT_MODEL_BATCH} in "
                             f"the default run, which times VQA generation only, and {model_bench.CPU_BATCH} with --quick or "
                             "--full, since the training step's hard negatives need 2)")
    parser.add_argument("--vision-lens", type=int, nargs="+", default=None, help="Lv values (default: by mode and device)")
    parser.add_argument("--text-len", type=int, default=fusion.TEXT_LEN, help="text tokens Lt (default %(default)s)")
    parser.add_argument("--variants", nargs="+", choices=fusion.VARIANTS, default=fusion.VARIANTS)
    parser.add_argument("--passes", nargs="+", choices=fusion.PASSES, default=fusion.PASSES)
    parser.add_argument("--no-model", action="store_true", help="skip the full-model rows")
    parser.add_argument("--all", action="store_true", help="also run the kernel benchmarks (the whole suite, one call)")
    args = parse_benchmark_args(parser, argv, quick_threads=QUICK_THREADS)
    args.mode = "quick" if args.quick else ("full" if args.full or device.type == "cuda" else "default")
    args.config = args.config or ("tiny" if args.quick else "base")
    default_lens = {"quick": QUICK_VISION_LENS, "full": fusion.VISION_LENS, "default": CPU_DEFAULT_VISION_LENS}[args.mode]
    default_grid = args.mode == "default" and args.vision_lens is None and tuple(args.passes) == fusion.PASSES
    if args.mode == "default":
        args.backends = args.backends or list(CPU_DEFAULT_BACKENDS)
    args.vision_lens = args.vision_lens or default_lens
    args.groups = CPU_DEFAULT_GROUPS if default_grid else tuple(itertools.product(args.passes, args.vision_lens))
    args.model_tasks = CPU_DEFAULT_MODEL_TASKS if args.mode == "default" else model_bench.TASKS
    args.model_image_size = CPU_DEFAULT_IMAGE_SIZE if args.mode == "default" else None
    if args.mode == "default":
        args.model_batch = args.model_batch or CPU_DEFAULT_MODEL_BATCH
    return args


def expected_duration(device: torch.device, mode: str) -> str:
    """What this run should take: the committed run of the same mode on the same kind of device, with its load."""
    if mode == "quick":
        return QUICK_EXPECTED
    runs = [payload["environment"] for payload in report.committed_payloads()
            if payload["environment"].get("device_type") == device.type and payload.get("mode") == mode]
    if not runs:
        return f"unknown (no committed {mode} run on a {device.type} under {report.RESULTS_ROOT.name}/)"
    wall, cpu = sum(env["wall_s"] for env in runs), sum(env.get("process_cpu_s") or 0.0 for env in runs)
    load = max(env.get("load_average_before") or 0.0 for env in runs)
    return (f"about {wall / 60:.1f} min (the committed {mode} run on a {device.type}: {cpu / 60:.1f} CPU-min at load "
            f"average {load:.1f}; a busier machine takes longer)")


def run_fusion(args, device, policy) -> Path:
    """The fusion-variant benchmark: JSON, PNG, table."""
    run = Run(device, policy)

    def write(rows, ratios, extra) -> Path:
        return write_results("fusion", run, rows, args.json_dir, ratios, mode=args.mode, **extra)

    path = write(*fusion.run(device, policy, args.config, args.batch, args.vision_lens, args.text_len,
                             args.backends, args.variants, args.passes, after_group=write, groups=args.groups))
    payload = report.load(path)
    report.plot_fusion(payload, path.with_suffix(".png"))
    print(report.fusion_table(payload) + "\n", flush=True)
    return path


def run_model(args, device, policy) -> Path:
    """The full-model rows: JSON and table."""
    run = Run(device, policy)
    rows, ratios, extra = model_bench.run(device, policy, args.config, args.model_batch, args.model_image_size, args.model_tasks)
    path = write_results("model", run, rows, args.json_dir, ratios, mode=args.mode, **extra)
    print(report.model_table(report.load(path)) + "\n", flush=True)
    return path


def run_kernels(args) -> None:
    """The kernel benchmarks, each as its own process writing into the same folder."""
    flags = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    flags += ["--budget", str(args.budget)] if args.budget is not None else []
    names = ["bench_co_attention"] + [n for n in OTHER_KERNEL_BENCHMARKS if (Path(__file__).parent / f"{n}.py").exists()]
    for name in names:
        print(f"== python -m bench.{name}", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{name}", "--json-dir", str(args.json_dir), *flags], check=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the main job; returns the exit status."""
    device = default_device()
    args = parse_args(argv, device)
    policy = TimingPolicy.for_device(device, args.budget)
    cells = len(args.groups) * len(args.variants)
    if device.type == "cpu":
        print("CPU run: our Triton and CUDA kernels do not run on a CPU. Measured instead: the paper's claim, i.e. "
              "mPLUG's skip-connected fusion network against connected and two-way attention, on PyTorch attention "
              f"({', '.join(args.backends or ['every available backend'])}), and the full model (KV cache vs none).",
              flush=True)
    print(f"device {device} | mode {args.mode} | config {args.config} | (pass, Lv) {list(args.groups)} | {cells} fusion cells "
          f"per backend, each one profiled warm-up + {policy.min_repeats}..{policy.max_repeats} repeats | "
          f"expected duration: {expected_duration(device, args.mode)} | results in {args.json_dir}", flush=True)
    written = [run_fusion(args, device, policy)]
    if not args.no_model:
        written.append(run_model(args, device, policy))
    if args.all:
        run_kernels(args)
    print("wrote " + ", ".join(str(p) for p in written) + f" and {written[0].with_suffix('.png')}")
    print(verdict(report.load(written[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
