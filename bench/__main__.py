"""``python -m bench``: the paper's efficiency claim on this machine, then what our kernels add.

Times mPLUG's fusion network in its three variants (skip, connected, coattn) across Lv in {257, 577, 901, 1025}
(Lt = 25), forward and training step, on every available attention backend; then the full-model rows (training
step, VQA generation). Prints the tables and writes JSON + PNG under --json-dir (default bench/out/).
On the CPU the batch is scaled down automatically (the tables say which device and batch were used).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from bench import fusion, model_bench, report
from bench.common import RESULTS_DIR, benchmark_parser, default_device, parse_benchmark_args, quick_mode, write_results

QUICK_VISION_LENS = (17, 33)
OTHER_KERNEL_BENCHMARKS = ("bench_concat_attention", "bench_fusion_layers")


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = benchmark_parser("python -m bench", __doc__)
    parser.add_argument("--config", choices=sorted(fusion.CONFIGS), default=None, help="model size (default base; tiny with --quick)")
    parser.add_argument("--batch", type=int, default=None, help="fusion batch (default 64 on a GPU, 1 on the CPU)")
    parser.add_argument("--model-batch", type=int, default=None, help="full-model batch (default 32 on a GPU, 2 on the CPU)")
    parser.add_argument("--vision-lens", type=int, nargs="+", default=None, help=f"Lv values (default {fusion.VISION_LENS})")
    parser.add_argument("--text-len", type=int, default=fusion.TEXT_LEN)
    parser.add_argument("--variants", nargs="+", choices=fusion.VARIANTS, default=fusion.VARIANTS)
    parser.add_argument("--passes", nargs="+", choices=fusion.PASSES, default=fusion.PASSES)
    parser.add_argument("--no-model", action="store_true", help="skip the full-model rows")
    parser.add_argument("--all", action="store_true", help="also run the kernel benchmarks (the whole suite, one call)")
    args = parse_benchmark_args(parser, argv)
    args.quick = args.quick or quick_mode()
    args.config = args.config or ("tiny" if args.quick else "base")
    args.vision_lens = args.vision_lens or (QUICK_VISION_LENS if args.quick else fusion.VISION_LENS)
    args.json_dir = Path(args.json_dir or RESULTS_DIR)
    if args.quick:
        args.min_run_time = min(args.min_run_time, 0.02)
    return args


def run_fusion(args, device) -> Path:
    """The fusion-variant benchmark: JSON, PNG, table."""
    rows, extra = fusion.run(device, args.config, args.batch, args.vision_lens, args.text_len, args.backends,
                             args.variants, args.passes, args.min_run_time)
    path = write_results("fusion", device, rows, args.json_dir, **extra)
    payload = report.load(path)
    report.plot_fusion(payload, path.with_suffix(".png"))
    print(report.fusion_table(payload) + "\n")
    return path


def run_model(args, device) -> Path:
    """The full-model rows: JSON and table."""
    rows, extra = model_bench.run(device, args.config, args.model_batch, args.min_run_time)
    path = write_results("model", device, rows, args.json_dir, **extra)
    print(report.model_table(report.load(path)) + "\n")
    return path


def run_kernels(args) -> None:
    """The kernel benchmarks, each as its own process writing into the same folder."""
    flags = (["--quick"] if args.quick else []) + (["--threads", str(args.threads)] if args.threads else [])
    names = ["bench_co_attention"] + [n for n in OTHER_KERNEL_BENCHMARKS if (Path(__file__).parent / f"{n}.py").exists()]
    for name in names:
        print(f"== python -m bench.{name}", flush=True)
        subprocess.run([sys.executable, "-m", f"bench.{name}", "--json-dir", str(args.json_dir), *flags], check=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the main job; returns the exit status."""
    args = parse_args(argv)
    device = default_device()
    print(f"device {device} | config {args.config} | results in {args.json_dir}", flush=True)
    written = [run_fusion(args, device)]
    if not args.no_model:
        written.append(run_model(args, device))
    if args.all:
        run_kernels(args)
    print("wrote " + ", ".join(str(p) for p in written) + f" and {written[0].with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
