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

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import Grids, TimingPolicy, bench_dtype, kernel_benchmark_cli, measure, paired_ratio, progress, write_results
from bench.report import fusion_layers_table
from bench.tables import load
from mplug_kernels.backends import AttentionCall, select_backend
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


def pass_functions(run: Callable[[], Sequence[torch.Tensor]], grad_inputs: Optional[List[torch.Tensor]]) -> Dict[str, Callable]:
    """{'fwd': no-grad run(), 'fwd_bwd': run() and the gradients of grad_inputs} (fwd only without grad_inputs)."""
    def forward():
        with torch.no_grad():
            return run()

    def forward_backward():
        outs = run()
        return torch.autograd.grad(outs, grad_inputs, [torch.ones_like(o) for o in outs], allow_unused=True)

    return {"fwd": forward, "fwd_bwd": forward_backward} if grad_inputs is not None else {"fwd": forward}


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
        (f"auto K/V strategy (ours[{backend}])", backend, "auto", True),
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


def _ratio_rows(timings: dict, base_row: dict, baseline: str) -> List[dict]:
    """Per pass, each variant's ms over the baseline's ms, paired per round."""
    rows = []
    for (name, pass_name), timing in timings.items():
        reference = timings.get((baseline, pass_name))
        ratio = paired_ratio(timing, reference) if reference is not None and name != baseline else None
        if ratio is not None:
            rows.append({**base_row, "ratio": f"{name}/{baseline}", "backend": name, "pass": pass_name, **ratio.row()})
    return rows


def run(device, grid, policy: TimingPolicy, backend: str) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields): the three sections over the grid; the variants of a case interleaved."""
    dtype = bench_dtype(device)
    batch = grid["batch"]
    cases = [("connected", lv, TEXT_LEN) for lv in grid["vision_lens"]] + [("stack", lv, TEXT_LEN) for lv in grid["vision_lens"]]
    cases += [("absorb", max(grid["vision_lens"]), q_len) for q_len in grid["absorb_q_lens"]]
    rows, ratios = [], []
    for section, vision_len, q_len in progress(cases, "fusion layers"):
        if section == "connected":
            variants = connected_variants(backend, dtype, device, batch, vision_len)
        elif section == "stack":
            variants = stack_variants(backend, dtype, device, batch, vision_len)
        else:
            variants = absorb_variants(backend, dtype, device, batch, vision_len, q_len)
        functions = {(name, pass_name): function for name, (run_variant, grad_inputs) in variants.items()
                     for pass_name, function in pass_functions(run_variant, grad_inputs).items()}
        timings = measure(functions, device, policy)
        base = {"op": f"fusion_layers:{section}", "section": section, "dtype": str(dtype).replace("torch.", ""),
                "batch": batch, "heads": HEADS, "head_dim": HIDDEN // HEADS, "q_len": q_len, "k_len": vision_len}
        rows += [{**base, "backend": name, "pass": pass_name, **timing.row()} for (name, pass_name), timing in timings.items()]
        ratios += _ratio_rows(timings, base, "torch.cat+sdpa" if section == "connected" else "per-layer projection (sdpa)")
    extra = {
        "benchmark": "fusion_layers",
        "grid": dict(grid) | {"hidden": HIDDEN, "heads": HEADS, "ffn": FFN, "text_len": TEXT_LEN, "stack_layers": STACK_LAYERS},
        "dtype": str(dtype).replace("torch.", ""),
        "ours_backend": backend,
        "resolved_backends": sorted({name for row in rows for name in row.get("attention_backends", [])}),
        "notes": {
            "connected": "baseline: torch.cat([v; t]) + projections + SDPA (default kernel choice) + FFN, same weights",
            "stack": "three cross-attention blocks (no text self-attention/FFN); text chained; q_len = Lt, k_len = Lv",
            "absorb": "one cross-attention block; 'cached K/V reused' excludes the projection (forward only)",
            "ratios": "variant ms / baseline ms per round: torch.cat+sdpa (connected), per-layer projection (sdpa) otherwise",
        },
    }
    return rows, ratios, extra


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: run the three sections, write fusion_layers.json, print the table."""
    args, device, grid, run_record = kernel_benchmark_cli("bench.bench_fusion_layers", __doc__, GRIDS, argv)
    call = AttentionCall(device.type, bench_dtype(device), HIDDEN // HEADS, 2, True, True, False)
    backend = args.backends[0] if args.backends else select_backend("auto", call).name
    rows, ratios, extra = run(device, grid, run_record.policy, backend)
    path = write_results("fusion_layers", run_record, rows, args.json_dir, ratios, **extra)
    print(fusion_layers_table(load(path)))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
