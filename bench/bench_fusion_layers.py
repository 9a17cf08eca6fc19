"""Layer benchmarks: the connected layer, a co-attention stack, and absorbed vs projected K/V.

``python -m bench.bench_fusion_layers [--json-dir DIR] [--quick] [--backends triton ...]``
Base model widths (hidden 768, 12 heads, FFN 3072), Lt = 25 with a padded text mask, vision unmasked.
- connected: ConnectedAttention (per-stream work + concat_attention) vs the torch.cat + SDPA layer.
- stack: three CoAttention cross-attention blocks over one image (text chained through them): per-layer
  projection (SDPA and ours), hoisted one-GEMM K/V, hoisted K/V reused (a second question about the
  same image, forward only), absorbed K/V, and auto.
- absorb: one CoAttention over Lq in {1, 5, 25, 64, 80}: project, absorb, auto and cached K/V.
Passes: fwd (no grad) and fwd_bwd (gradients of inputs and parameters), with peak memory for each.
On the CPU the batch and lengths are scaled down (the JSON says which device and grid were used).
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import (
    Grids,
    bench_dtype,
    kernel_benchmark_cli,
    peak_memory_mb,
    progress,
    time_ms,
    write_results,
)
from mplug_kernels.nn import CoAttention, CoAttentionStack, ConnectedAttention
from mplug_kernels.nn.connected_attention import concatenated_connected_attention

GRIDS = Grids(
    quick={"batch": 1, "vision_lens": (65,), "absorb_q_lens": (5,)},
    gpu={"batch": 64, "vision_lens": (257, 577), "absorb_q_lens": (1, 5, 25, 64, 80)},
    cpu={"batch": 2, "vision_lens": (257,), "absorb_q_lens": (1, 25, 80)},
)
HIDDEN, HEADS, FFN, TEXT_LEN, STACK_LAYERS = 768, 12, 3072, 25, 3
PASSES = ("fwd", "fwd_bwd")


def make_inputs(batch: int, vision_len: int, text_len: int, dtype, device, seed: int = 0):
    """vision [B, Lv, 768], text [B, Lt, 768] (requiring grad) and a text padding mask (60-100% kept)."""
    generator = torch.Generator().manual_seed(seed)
    tensor = lambda n: torch.randn(batch, n, HIDDEN, generator=generator).to(device=device, dtype=dtype).requires_grad_()
    kept = torch.randint(max(1, int(0.6 * text_len)), text_len + 1, (batch,), generator=generator)
    return tensor(vision_len), tensor(text_len), (torch.arange(text_len)[None, :] < kept[:, None]).to(device)


def measure(run: Callable[[], Sequence[torch.Tensor]], grad_inputs: Optional[List[torch.Tensor]], device, min_run_time) -> dict:
    """fwd (no grad) and, given grad_inputs, fwd_bwd timings and peak memory of run() -> outputs."""
    def forward():
        with torch.no_grad():
            return run()

    def forward_backward():
        outs = run()
        return torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs], allow_unused=True)

    functions = {"fwd": forward, "fwd_bwd": forward_backward if grad_inputs is not None else None}
    row = {}
    for name, function in functions.items():
        if function is None:
            continue
        try:
            row[f"{name}_ms"] = time_ms(function, device, min_run_time=min_run_time)
            row[f"{name}_peak_mb"] = peak_memory_mb(function, device)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
            row[f"{name}_error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return row


def connected_variants(backend: str, dtype, device, batch, vision_len):
    """{name: (run, grad inputs)} for the connected layer: ours and the torch.cat + SDPA layer, same weights."""
    layer = ConnectedAttention(HIDDEN, HEADS, FFN, backend=backend).to(device=device, dtype=dtype)
    vision, text, text_mask = make_inputs(batch, vision_len, TEXT_LEN, dtype, device)
    grad_inputs = [vision, text, *layer.parameters()]
    return {
        "torch.cat+sdpa": (lambda: concatenated_connected_attention(layer, vision, text, None, text_mask), grad_inputs),
        f"ours[{backend}]": (lambda: layer(vision, text, None, text_mask), grad_inputs),
    }


def _chain(layers, text, vision, mask, cache=None):
    for index, layer in enumerate(layers):
        text = layer(text, vision, mask) if cache is None else layer(text, encoder_attention_mask=mask, vision_kv=cache[index])
    return (text,)


def _layers(count: int, backend: str, kv_strategy: str, dtype, device):
    torch.manual_seed(0)
    return [CoAttention(HIDDEN, HEADS, backend=backend, kv_strategy=kv_strategy).to(device=device, dtype=dtype) for _ in range(count)]


def stack_variants(backend: str, dtype, device, batch, vision_len, text_len=TEXT_LEN, count=STACK_LAYERS):
    """{name: (run, grad inputs or None)}: the ways to run `count` co-attention blocks over one image."""
    vision, text, text_mask = make_inputs(batch, vision_len, text_len, dtype, device)
    vision_mask = None
    variants = {}
    for name, layer_backend, strategy, hoist in [
        ("per-layer projection (sdpa)", "sdpa", "project", False),
        (f"per-layer projection (ours[{backend}])", backend, "project", False),
        (f"hoisted K/V (ours[{backend}])", backend, "project", True),
        ("absorbed K/V (ours)", backend, "absorb", True),
        (f"auto (ours[{backend}])", backend, "auto", True),
    ]:
        layers = _layers(count, layer_backend, strategy, dtype, device)
        stack = CoAttentionStack(layers)
        grad_inputs = [vision, text, *(p for layer in layers for p in layer.parameters())]
        run = (lambda l=layers, s=stack: _chain(l, text, None, vision_mask, s.vision_kv(vision))) if hoist else (
            lambda l=layers: _chain(l, text, vision, vision_mask))
        variants[name] = (run, grad_inputs)
    layers = _layers(count, backend, "auto", dtype, device)
    with torch.no_grad():
        cache = CoAttentionStack(layers).vision_kv(vision.detach()).project()
    variants[f"cached K/V reused (ours[{backend}])"] = (lambda: _chain(layers, text, None, vision_mask, cache), None)
    del text_mask
    return variants


def absorb_variants(backend: str, dtype, device, batch, vision_len, q_len):
    """One co-attention block at Lq = q_len: project, absorb, auto, and K/V cached (decode steps)."""
    return stack_variants(backend, dtype, device, batch, vision_len, text_len=q_len, count=1)


def _with_speedups(rows: List[dict], baseline: str) -> List[dict]:
    """Add, per pass, baseline ms / row ms for rows of the same section and shape."""
    key = lambda row: (row["section"], row["batch"], row["q_len"], row["k_len"])
    base = {key(row): row for row in rows if row["backend"] == baseline}
    for row in rows:
        reference = base.get(key(row), {})
        for name in PASSES:
            if row.get(f"{name}_ms") and reference.get(f"{name}_ms"):
                row[f"{name}_speedup_vs_baseline"] = reference[f"{name}_ms"] / row[f"{name}_ms"]
    return rows


def run(device, grid, backend: str = "auto", min_run_time: float = 0.2) -> Tuple[List[dict], dict]:
    """(rows, extra JSON fields): the three sections over the grid."""
    dtype = bench_dtype(device)
    batch = grid["batch"]
    cases = [("connected", lv, TEXT_LEN) for lv in grid["vision_lens"]] + [("stack", lv, TEXT_LEN) for lv in grid["vision_lens"]]
    cases += [("absorb", max(grid["vision_lens"]), q_len) for q_len in grid["absorb_q_lens"]]
    rows = []
    for section, vision_len, q_len in progress(cases, "fusion layers"):
        if section == "connected":
            variants = connected_variants(backend, dtype, device, batch, vision_len)
        elif section == "stack":
            variants = stack_variants(backend, dtype, device, batch, vision_len)
        else:
            variants = absorb_variants(backend, dtype, device, batch, vision_len, q_len)
        for name, (function, grad_inputs) in variants.items():
            row = {"op": f"fusion_layers:{section}", "section": section, "backend": name, "dtype": str(dtype).replace("torch.", ""),
                   "batch": batch, "heads": HEADS, "head_dim": HIDDEN // HEADS, "q_len": q_len, "k_len": vision_len}
            rows.append(row | measure(function, grad_inputs, device, min_run_time))
    rows = _with_speedups([r for r in rows if r["section"] == "connected"], "torch.cat+sdpa") + _with_speedups(
        [r for r in rows if r["section"] != "connected"], "per-layer projection (sdpa)")
    extra = {
        "benchmark": "fusion_layers",
        "grid": dict(grid) | {"hidden": HIDDEN, "heads": HEADS, "ffn": FFN, "text_len": TEXT_LEN, "stack_layers": STACK_LAYERS},
        "dtype": str(dtype).replace("torch.", ""),
        "backend": backend,
        "notes": {
            "connected": "baseline: torch.cat([v; t]) + projections + SDPA (default kernel choice) + FFN, same weights",
            "stack": "three cross-attention blocks (no text self-attention/FFN); text chained; q_len = Lt, k_len = Lv",
            "absorb": "one cross-attention block; 'cached K/V reused' excludes the projection (forward only)",
            "speedup": "baseline ms / row ms per pass: torch.cat+sdpa (connected), per-layer projection (sdpa) otherwise",
        },
    }
    return rows, extra


def table(rows: List[dict]) -> str:
    """Markdown table of the rows."""
    from bench.report import markdown_table

    header = ["section", "B", "Lq", "Lv", "variant", "fwd ms", "fwd x", "fwd MiB", "fwd+bwd ms", "fwd+bwd x", "fwd+bwd MiB"]
    body = [[r["section"], r["batch"], r["q_len"], r["k_len"], r["backend"], r.get("fwd_ms"), r.get("fwd_speedup_vs_baseline"),
             r.get("fwd_peak_mb"), r.get("fwd_bwd_ms"), r.get("fwd_bwd_speedup_vs_baseline"), r.get("fwd_bwd_peak_mb")] for r in rows]
    return markdown_table(header, body)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: run the three sections, write fusion_layers.json, print the table."""
    args, device, grid = kernel_benchmark_cli("bench.bench_fusion_layers", __doc__, GRIDS, argv)
    backend = args.backends[0] if args.backends else "auto"
    rows, extra = run(device, grid, backend, args.min_run_time)
    path = write_results("fusion_layers", device, rows, args.json_dir, **extra)
    print(table(rows))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
