"""Kernel benchmark of mPLUG-Owl3 shapes: our kernels against FlexAttention, flash-attn, xformers and dense-mask SDPA.

``python -m bench.bench_owl3 [--json-dir DIR] [--quick] [--backends triton flex sdpa_dense ...]``
Grouped heads (GPU: Hq 28, Hkv 4, D 128, bfloat16). Owl3 rows: text queries over [visual; text] keys, causal text,
each image's keys visible from the image's text position on (1, 4, 8 images of 729 keys spread over text 512 and
2048, and 32 video frames at the start of text 512): forward, backward, forward+backward. Decode rows: one query
over a cache of [images; text] (Lk 1500 and 6404, text padded per row), B 1, 8, 64: forward only. On the CPU the
grids are scaled down (float32); FlexAttention is compiled there too, except with --quick (eager, labelled so).
Every row carries the label of what its runner had to do (bench.peers); rows follow bench_co_attention's format.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.bench_co_attention import PASSES, time_runners
from bench.common import (
    Grids, TimingPolicy, bench_dtype, kernel_benchmark_cli, measured_bandwidth_gbs, progress, write_results,
)
from bench.peers import LabelledRunner, Problem, Visibility, peer_runners
from mplug_kernels import concat_attention
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.triton import interpreter_on

GRIDS = Grids(
    quick={"heads": (4, 1, 32), "image_len": 16, "owl3_batch": 2, "text": (32,), "images": (1,), "video_frames": 2,
           "decode_batch": (2,), "decode_cache": ((1, 20),)},
    gpu={"heads": (28, 4, 128), "image_len": 729, "owl3_batch": 1, "text": (512, 2048), "images": (1, 4, 8),
         "video_frames": 32, "decode_batch": (1, 8, 64), "decode_cache": ((1, 771), (8, 572))},
    cpu={"heads": (4, 1, 32), "image_len": 49, "owl3_batch": 2, "text": (64,), "images": (1, 2), "video_frames": 4,
         "decode_batch": (1, 8), "decode_cache": ((1, 101), (8, 248))},
)
OUR_BACKENDS = ("cuda", "triton", "sdpa")
OUR_LABELS = {
    "cuda": "ours: one kernel over the sources (no torch.cat); padding and positions read in the kernel",
    "triton": "ours: one kernel over the sources (no torch.cat); padding and positions read in the kernel",
    "sdpa": "ours (sdpa backend): torch.cat + dense mask built per call; enable_gqa",
}


@dataclass(frozen=True)
class Case:
    """One row's problem: text queries (or one decode query) over [images x image_len; text] keys."""

    use: str  # "owl3 images", "owl3 video" or "decode"
    batch: int
    heads: Tuple[int, int, int]  # query heads, K/V heads, head dim
    q_len: int
    images: int
    image_len: int
    text_len: int

    @property
    def positional(self) -> bool:
        return self.use != "decode"

    @property
    def k_len(self) -> int:
        return self.images * self.image_len + self.text_len

    @property
    def passes(self) -> Tuple[str, ...]:
        return PASSES if self.positional else ("fwd",)

    def flops(self, pass_name: str) -> int:
        """Dense matmul FLOPs (hidden pairs counted): forward 4*B*Hq*Lq*Lk*D; backward 2.5x; both 3.5x."""
        forward = 4 * self.batch * self.heads[0] * self.q_len * self.k_len * self.heads[2]
        return {"fwd": forward, "bwd": forward * 5 // 2, "fwd_bwd": forward * 7 // 2}[pass_name]

    def bytes_moved(self, pass_name: str, element_size: int) -> int:
        """Compulsory bytes: q, out on Hq heads and k, v on Hkv heads once (backward: with dout, dq, dk, dv)."""
        q_heads, kv_heads, dim = self.heads
        forward = element_size * self.batch * dim * (2 * self.q_len * q_heads + 2 * self.k_len * kv_heads)
        return {"fwd": forward, "bwd": 2 * forward, "fwd_bwd": 3 * forward}[pass_name]

    def image_positions(self) -> List[int]:
        """Each image's text position: video frames at 0, 1, ...; images spread evenly over the text."""
        if self.use == "owl3 video":
            return list(range(self.images))
        return [i * self.text_len // self.images for i in range(self.images)]

    def row(self, dtype: torch.dtype) -> dict:
        return {"op": "owl3", "use": self.use, "dtype": str(dtype).replace("torch.", ""), "batch": self.batch,
                "heads": self.heads[0], "kv_heads": self.heads[1], "head_dim": self.heads[2], "q_len": self.q_len,
                "k_len": self.k_len, "images": self.images, "image_len": self.image_len, "text_len": self.text_len}


def grid_cases(grid: dict) -> List[Case]:
    """Decode and Owl3 cases alternating, each kind smallest first (a run cut short has both kinds), video last."""
    heads, image_len = tuple(grid["heads"]), grid["image_len"]
    decode = [Case("decode", batch, heads, 1, images, image_len, text)
              for (images, text) in grid["decode_cache"] for batch in grid["decode_batch"]]
    owl3 = [Case("owl3 images", grid["owl3_batch"], heads, text, images, image_len, text)
            for text in grid["text"] for images in grid["images"]]
    text = grid["text"][0]
    owl3.append(Case("owl3 video", grid["owl3_batch"], heads, text, grid["video_frames"], image_len, text))
    return [case for pair in itertools.zip_longest(decode, owl3) for case in pair if case is not None]


def visibility_args(case: Case, device: torch.device):
    """(masks, key_positions, query_positions) for concat_attention: rows after the first keep 75-100% of the text."""
    generator = torch.Generator().manual_seed(0)
    kept = torch.randint(int(0.75 * case.text_len), case.text_len + 1, (case.batch,), generator=generator)
    kept[0] = case.text_len
    text_mask = (torch.arange(case.text_len)[None] < kept[:, None]).to(device) if case.batch > 1 else None
    if not case.positional:
        return (None, text_mask), None, None
    image_positions = torch.tensor(case.image_positions(), dtype=torch.int32).repeat_interleave(case.image_len)
    text_positions = torch.arange(case.text_len, dtype=torch.int32)
    keys = tuple(p.repeat(case.batch, 1).to(device) for p in (image_positions, text_positions))
    return (None, text_mask), keys, keys[1]


def make_tensors(case: Case, dtype: torch.dtype, device: torch.device, requires_grad: bool = False):
    """q [B, Lq, Hq, D], ks and vs ([B, n x image_len, Hkv, D], [B, text, Hkv, D]), drawn on the device."""
    generator = torch.Generator(device=device).manual_seed(1)
    q_heads, kv_heads, dim = case.heads

    def tensor(length: int, heads: int) -> torch.Tensor:
        values = torch.randn(case.batch, length, heads, dim, generator=generator, device=device)
        return values.to(dtype).requires_grad_(requires_grad)

    lengths = (case.images * case.image_len, case.text_len)
    q, ks = tensor(case.q_len, q_heads), tuple(tensor(n, kv_heads) for n in lengths)
    return q, ks, tuple(tensor(n, kv_heads) for n in lengths)


def our_runners(case: Case, device: torch.device, dtype: torch.dtype, masks, key_positions, query_positions):
    """(our backends that declare support for the case's forward: grouped heads, padding, positions; {name: why not})."""
    call = AttentionCall(device.type, dtype, case.heads[2], 2, any(m is not None for m in masks), False, False,
                         kv_group=case.heads[0] // case.heads[1], has_positions=case.positional)
    runners, skipped = [], {}
    for name in OUR_BACKENDS:
        reasons = BACKENDS[name].reasons(call)
        if name == "triton" and device.type == "cpu" and interpreter_on():
            reasons = ["TRITON_INTERPRET=1 emulates the kernel on the CPU: not a performance measurement"]
        if reasons:
            skipped[name] = "; ".join(reasons)
            continue
        attend = lambda q, ks, vs, name=name: concat_attention(q, ks, vs, masks, key_positions=key_positions,
                                                               query_positions=query_positions, backend=name)
        runners.append(LabelledRunner(name, attend, label=OUR_LABELS[name]))
    return runners, skipped


def case_runners(case: Case, ks, compile_flex: bool, requested=None) -> Tuple[List[LabelledRunner], Dict[str, str]]:
    """(ours then the peers, {runner: why skipped}) for key sources ks; only requested names (or the part before '[')."""
    device, dtype = ks[0].device, ks[0].dtype
    args = visibility_args(case, device)
    ours, skipped = our_runners(case, device, dtype, *args)
    visibility = Visibility.of(ks, *args)
    problem = Problem(case.batch, case.q_len, case.k_len, case.heads[0], case.heads[1], visibility, device)
    peers, peers_skipped = peer_runners(problem, compile_flex)
    runners = [r for r in ours + peers if not requested or r.name in requested or r.name.split("[")[0] in requested]
    return runners, skipped | peers_skipped


def _raising(error: Exception) -> Callable[[], object]:
    def fail():
        raise error

    return fail


def pass_functions(runner: LabelledRunner, plain, with_grad) -> Dict[str, Callable[[], object]]:
    """{pass: callable} on shared (q, ks, vs); run once here (compiling untimed); a missing backward raises why."""
    def forward():
        with torch.no_grad():
            return runner.attend(*plain)

    forward()
    if with_grad is None:
        return {"fwd": forward}
    q, ks, vs = with_grad
    inputs = [q, *ks, *vs]
    try:
        out = runner.attend(q, ks, vs)
        dout = torch.randn_like(out)
        torch.autograd.grad(out, inputs, dout, retain_graph=True)
    except (RuntimeError, ValueError) as error:
        return {"fwd": forward, "bwd": _raising(error), "fwd_bwd": _raising(error)}
    return {"fwd": forward, "bwd": lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True),
            "fwd_bwd": lambda: torch.autograd.grad(runner.attend(q, ks, vs), inputs, dout)}


def run(device, grid, policy: TimingPolicy, backends=None, compile_flex: bool = True,
        after_case: Optional[Callable] = None) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields) for every case and runner; after_case(rows, ratios, extra) after each."""
    dtype = bench_dtype(device)
    bandwidth = measured_bandwidth_gbs(device)
    rows, ratios, skipped, labels = [], [], {}, {}
    extra = {"benchmark": "owl3", "dtype": str(dtype).replace("torch.", ""), "hbm_bandwidth_gbs": bandwidth,
             "grid": {**grid, "heads": grid["heads"][0], "kv_heads": grid["heads"][1], "head_dim": grid["heads"][2]},
             "counting": {"flops": "dense: 4*B*Hq*Lq*Lk*D forward (hidden pairs counted), bwd 2.5x",
                          "bytes": "q, out on Hq heads, k, v on Hkv heads once (bwd adds dout, dq, dk, dv)",
                          "ratios": "runner / the fastest of sdpa and sdpa_dense[...] in the same round",
                          "labels": "what each runner had to do; untimed = once per shape, outside the timed call"}}
    for case in progress(grid_cases(grid), "owl3"):
        plain = make_tensors(case, dtype, device)
        runners, why = case_runners(case, plain[1], compile_flex, backends)
        with_grad = make_tensors(case, dtype, device, requires_grad=True) if "bwd" in case.passes else None
        shape_rows, shape_ratios = time_runners(
            runners, lambda runner: pass_functions(runner, plain, with_grad), case.row(dtype), case, dtype, device,
            bandwidth, policy, passes=case.passes)
        labels[case.use] = {runner.name: runner.label for runner in runners}
        rows += [row | {"label": labels[case.use][row["backend"]]} for row in shape_rows]
        ratios += shape_ratios
        skipped |= {f"{name} ({case.use})": reason for name, reason in why.items()}
        extra |= {"resolved_backends": sorted({row["backend"] for row in rows}), "labels": labels,
                  "skipped_backends": skipped}
        if after_case:
            after_case(rows, ratios, extra)
    return rows, ratios, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: run the grid, write owl3.json after every case, print the table and every runner's label."""
    from bench import report

    args, device, grid, run_record = kernel_benchmark_cli("bench.bench_owl3", __doc__, GRIDS, argv)
    write = lambda rows, ratios, extra: write_results("owl3", run_record, rows, args.json_dir, ratios, **extra)
    compile_flex = not (args.quick and device.type == "cpu")
    path = write(*run(device, grid, run_record.policy, args.backends, compile_flex, after_case=write))
    payload = report.load(path)
    print(report.kernel_table(payload))
    for use, labels in payload["labels"].items():
        print(f"\n{use}:\n" + "\n".join(f"- {name}: {label}" for name, label in labels.items()))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
