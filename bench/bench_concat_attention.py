"""Kernel benchmark of concat_attention against torch.cat + every SDPA kernel: forward, backward, peak memory.

``python -m bench.bench_concat_attention [--json-dir DIR] [--quick] [--backends triton sdpa ...]``
Two mPLUG uses, with the text source padded: the decoder's cross-attention (Lq in {1, 5, 25} over
[vision; text]) and the connected layer's self-attention (queries and keys both [vision; text]).
Rows follow bench_co_attention's format, with q_len and k_len the totals and q_lens / k_lens per source.
"""
from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from bench.bench_co_attention import HEAD_DIM, HEADS, SDPA_KERNELS, Runner, Shape, time_runners
from bench.common import Grids, TimingPolicy, bench_dtype, kernel_benchmark_cli, measured_bandwidth_gbs, progress, write_results
from mplug_kernels import concat_attention
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.triton import interpreter_on

GRIDS = Grids(
    quick={"batch": (1,), "vision_len": (65,), "decoder_q_len": (5,)},
    gpu={"batch": (8, 64), "vision_len": (257, 577), "decoder_q_len": (1, 5, 25)},
    cpu={"batch": (2,), "vision_len": (257, 577), "decoder_q_len": (1, 25)},
)
TEXT_LEN = 25


@dataclass(frozen=True)
class ConcatShape:
    """Query sources attending to key sources [vision; text] (the text source padded)."""

    use: str
    batch: int
    q_lens: Tuple[int, ...]
    k_lens: Tuple[int, ...]

    def total(self) -> Shape:
        """The same problem as one concatenated attention (what FLOPs and bytes are counted on)."""
        return Shape(self.batch, HEADS, HEAD_DIM, sum(self.q_lens), sum(self.k_lens))


def grid_shapes(grid: Dict[str, Sequence[int]]) -> List[ConcatShape]:
    """Decoder cross-attention shapes, then connected-layer self-attention shapes."""
    shapes = [
        ConcatShape("decoder", batch, (q_len,), (vision_len, TEXT_LEN))
        for batch, vision_len, q_len in itertools.product(grid["batch"], grid["vision_len"], grid["decoder_q_len"])
    ]
    shapes += [
        ConcatShape("connected", batch, (vision_len, TEXT_LEN), (vision_len, TEXT_LEN))
        for batch, vision_len in itertools.product(grid["batch"], grid["vision_len"])
    ]
    return shapes


def _runner(name: str, backend: str, context=contextlib.nullcontext) -> Runner:
    return Runner(name, lambda q, ks, vs, masks: concat_attention(q, ks, vs, masks, backend=backend), context)


def available_runners(device, dtype, requested=None) -> Tuple[List[Runner], Dict[str, str]]:
    """Our kernel backends (one kernel over the sources) and torch.cat + each SDPA kernel (sdpa[...])."""
    call = AttentionCall(device.type, dtype, HEAD_DIM, 2, True, True, False)
    runners, skipped = [], {}
    for name, backend in BACKENDS.items():
        reasons = backend.reasons(call)
        if name == "triton" and device.type == "cpu" and interpreter_on():
            reasons = ["TRITON_INTERPRET=1 emulates the kernel on the CPU: not a performance measurement"]
        if reasons:
            skipped[name] = "; ".join(reasons)
        elif name == "sdpa" and device.type == "cuda":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            for kernel, member in SDPA_KERNELS.items():
                runners.append(_runner(f"sdpa[{kernel}]", "sdpa", lambda m=member: sdpa_kernel(getattr(SDPBackend, m))))
        elif name in ("triton", "cuda", "sdpa"):
            runners.append(_runner(name, name))
    if requested:
        runners = [r for r in runners if r.name.split("[")[0] in requested or r.name in requested]
    return runners, skipped


def make_inputs(shape: ConcatShape, dtype, device, requires_grad=False):
    """Query sources, key and value sources [B, L, H, D] and masks (vision unmasked, text padded to 60-100%)."""
    generator = torch.Generator().manual_seed(0)

    def tensor(length):
        values = torch.randn(shape.batch, length, HEADS, HEAD_DIM, generator=generator)
        return values.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    text_kept = torch.randint(int(0.6 * TEXT_LEN), TEXT_LEN + 1, (shape.batch,), generator=generator)
    text_mask = (torch.arange(TEXT_LEN)[None, :] < text_kept[:, None]).to(device)
    queries = tuple(tensor(n) for n in shape.q_lens)
    q = queries if len(queries) > 1 else queries[0]
    return q, tuple(tensor(n) for n in shape.k_lens), tuple(tensor(n) for n in shape.k_lens), (None, text_mask)


def pass_functions(runner: Runner, shape: ConcatShape, dtype, device):
    """{'fwd', 'bwd', 'fwd_bwd'} callables on inputs allocated once (call inside runner.context())."""
    q, ks, vs, masks = make_inputs(shape, dtype, device)
    q_grad, ks_grad, vs_grad, _ = make_inputs(shape, dtype, device, requires_grad=True)
    inputs = [*(q_grad if isinstance(q_grad, tuple) else (q_grad,)), *ks_grad, *vs_grad]
    with runner.context():
        outs = runner.attend(q_grad, ks_grad, vs_grad, masks)
    outs = outs if isinstance(outs, tuple) else (outs,)
    douts = [torch.randn_like(o) for o in outs]

    def forward():
        with torch.no_grad():
            return runner.attend(q, ks, vs, masks)

    def backward():
        return torch.autograd.grad(outs, inputs, douts, retain_graph=True)

    def forward_backward():
        result = runner.attend(q_grad, ks_grad, vs_grad, masks)
        return torch.autograd.grad(result if isinstance(result, tuple) else (result,), inputs, douts)

    return {"fwd": forward, "bwd": backward, "fwd_bwd": forward_backward}


def run(device, grid, policy: TimingPolicy, backends=None) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields) for every shape and runner (runners of one shape interleaved)."""
    dtype = bench_dtype(device)
    runners, skipped = available_runners(device, dtype, backends)
    bandwidth = measured_bandwidth_gbs(device)
    rows, ratios = [], []
    for shape in progress(grid_shapes(grid), "concat_attention"):
        total = shape.total()
        base = {"op": "concat_attention", "use": shape.use, "dtype": str(dtype).replace("torch.", ""), "batch": shape.batch,
                "heads": HEADS, "head_dim": HEAD_DIM, "q_len": total.q_len, "k_len": total.k_len,
                "q_lens": list(shape.q_lens), "k_lens": list(shape.k_lens)}
        shape_rows, shape_ratios = time_runners(
            runners, lambda runner: pass_functions(runner, shape, dtype, device), base, total, dtype, device, bandwidth, policy)
        rows += shape_rows
        ratios += shape_ratios
    extra = {
        "benchmark": "concat_attention",
        "grid": {key: list(values) for key, values in grid.items()} | {"heads": HEADS, "head_dim": HEAD_DIM, "text_len": TEXT_LEN},
        "dtype": str(dtype).replace("torch.", ""),
        "resolved_backends": [runner.name for runner in runners],
        "hbm_bandwidth_gbs": bandwidth,
        "skipped_backends": skipped,
        "counting": {
            "flops": "as bench_co_attention on the totals Lq = sum q_lens, Lk = sum k_lens",
            "bytes": "as bench_co_attention on the totals (the torch.cat copy is not counted as useful bytes)",
            "baseline": "sdpa[...] rows run torch.cat of the key/value sources, then that SDPA kernel",
        },
    }
    return rows, ratios, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: run the grid, write concat_attention.json, print the table."""
    from bench import report

    args, device, grid, run_record = kernel_benchmark_cli("bench.bench_concat_attention", __doc__, GRIDS, argv)
    rows, ratios, extra = run(device, grid, run_record.policy, args.backends)
    path = write_results("concat_attention", run_record, rows, args.json_dir, ratios, **extra)
    print(report.kernel_table(report.load(path)))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
