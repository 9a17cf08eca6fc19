"""The paper's efficiency claim: the fusion network of mPLUG in its three variants, on every attention backend.

Variants (mplug.MPLUGConfig.fusion): "skip" (the paper's skip-connected network), "connected" (connected
attention over [v; t] in every layer) and "coattn" (co-attention in both directions). Passes: "forward"
(eval, no grad) and "train" (forward + backward of a scalar loss, dropout on; no optimizer update).
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import bench_dtype, peak_memory_mb, progress, time_ms
from bench.report import PAPER_MS_PER_100
from mplug import MPLUGConfig
from mplug.fusion import FusionEncoder
from mplug_kernels.backends import BACKENDS, AttentionCall

VARIANTS = ("skip", "connected", "coattn")
FUSION_BACKENDS = ("reference", "sdpa", "triton", "cuda")
BACKEND_LABELS = {
    "reference": "eager math (reference backend)",
    "sdpa": "sdpa",
    "triton": "triton (ours)",
    "cuda": "cuda (ours)",
}
VISION_LENS = (257, 577, 901, 1025)
TEXT_LEN = 25
PASSES = ("forward", "train")
CONFIGS = {"base": MPLUGConfig.base, "large": MPLUGConfig.large, "tiny": MPLUGConfig.tiny}


def _attention_macs(q_len: int, kv_len: int, hidden: int, heads: int, absorbed_kv: bool) -> int:
    """Multiply-adds of one BERT attention block (projections, scores, context, output) per sample.

    Projected K/V: K and V are kv_len x hidden x hidden GEMMs and each head attends at head width.
    Absorbed K/V: W_k and W_v fold into the query and output side (q_len x hidden x hidden each) and each
    head attends over the raw hidden-wide memory.
    """
    query_output = 2 * q_len * hidden * hidden
    if absorbed_kv:
        return query_output + 2 * q_len * hidden * hidden + 2 * heads * q_len * kv_len * hidden
    return query_output + 2 * kv_len * hidden * hidden + 2 * q_len * kv_len * hidden


def _co_attention_layer_macs(config: MPLUGConfig, length: int, other_len: int, absorbed_kv: bool) -> int:
    hidden, heads = config.hidden_size, config.num_heads
    return (
        _attention_macs(length, length, hidden, heads, False)
        + _attention_macs(length, other_len, hidden, heads, absorbed_kv)
        + 2 * length * hidden * config.intermediate_size
    )


def fusion_flops(config: MPLUGConfig, vision_len: int, text_len: int, absorbed_kv: bool = False) -> int:
    """Forward FLOPs (2 x multiply-adds) per sample of config's fusion network; absorbed_kv for text cross-attention."""
    total_len = vision_len + text_len
    connected = _attention_macs(total_len, total_len, config.hidden_size, config.num_heads, False) + (
        2 * total_len * config.hidden_size * config.intermediate_size
    )
    macs = 0
    for k in range(config.fusion_layers):
        if config.is_connected_layer(k):
            macs += connected
            continue
        macs += _co_attention_layer_macs(config, text_len, vision_len, absorbed_kv)
        if config.fusion == "coattn":
            macs += _co_attention_layer_macs(config, vision_len, text_len, False)
    return 2 * macs


def flop_ratios(config: MPLUGConfig, vision_lens: Sequence[int], text_len: int) -> Dict[str, Dict[str, float]]:
    """Same-backend FLOP ratios connected/skip and coattn/skip per Lv, with projected and with absorbed K/V in skip."""
    flops = {variant: config.replace(fusion=variant) for variant in VARIANTS}
    ratios = {}
    for vision_len in vision_lens:
        counts = {variant: fusion_flops(cfg, vision_len, text_len) for variant, cfg in flops.items()}
        skip_absorbed = fusion_flops(flops["skip"], vision_len, text_len, absorbed_kv=True)
        ratios[str(vision_len)] = {
            "skip_gflops": counts["skip"] / 1e9,
            "connected_gflops": counts["connected"] / 1e9,
            "coattn_gflops": counts["coattn"] / 1e9,
            "connected_over_skip": counts["connected"] / counts["skip"],
            "coattn_over_skip": counts["coattn"] / counts["skip"],
            "connected_over_skip_absorbed": counts["connected"] / skip_absorbed,
            "coattn_over_skip_absorbed": counts["coattn"] / skip_absorbed,
        }
    return ratios


def _attention_op_flops(q_shape, k_shapes, v_shapes, *args, out_shape=None, **kwargs) -> int:
    batch, q_len, heads, head_dim = q_shape
    return sum(4 * batch * heads * q_len * k_shape[1] * head_dim for k_shape in k_shapes)


def counted_flops(function: Callable[[], object]) -> int:
    """FLOPs torch.utils.flop_counter counts while function runs, our attention op included (QK^T and PV)."""
    from torch.utils.flop_counter import FlopCounterMode

    attention_op = torch.ops.mplug_kernels.attention_forward
    with FlopCounterMode(display=False, custom_mapping={attention_op: _attention_op_flops}) as counter:
        function()
    return counter.get_total_flops()


def fusion_backends(
    device: torch.device, dtype: torch.dtype, config: MPLUGConfig, requested: Optional[Sequence[str]] = None
) -> Tuple[List[str], Dict[str, str]]:
    """(backends to time, {skipped backend: why}) using the dispatcher's reasons for a fusion-layer call."""
    call = AttentionCall(device.type, dtype, config.hidden_size // config.num_heads, 2, True, True, False)
    names, skipped = [], {}
    for name in requested or FUSION_BACKENDS:
        reasons = BACKENDS[name].reasons(call)
        if name == "triton" and device.type == "cpu" and not requested:
            reasons = reasons or ["TRITON_INTERPRET=1 emulates the kernel on the CPU: not a performance measurement"]
        if reasons:
            skipped[name] = "; ".join(reasons)
        else:
            names.append(name)
    return names, skipped


def build_fusion(config: MPLUGConfig, variant: str, backend: str, device: torch.device, dtype: torch.dtype) -> FusionEncoder:
    """The fusion network of config in one variant on one backend (seeded: the same weights for every backend)."""
    torch.manual_seed(0)
    return FusionEncoder(config.replace(fusion=variant, attn_backend=backend)).to(device=device, dtype=dtype)


def fusion_inputs(config: MPLUGConfig, batch: int, vision_len: int, text_len: int, device, dtype):
    """(image_embeds, image_mask, text_embeds, text_mask): random features, all-True bool masks as in the model."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    vision = torch.randn(batch, vision_len, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    text = torch.randn(batch, text_len, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    ones = lambda length: torch.ones(batch, length, dtype=torch.bool, device=device)  # noqa: E731
    return vision, ones(vision_len), text, ones(text_len)


def step_function(fusion: FusionEncoder, inputs, pass_name: str) -> Callable[[], object]:
    """A zero-argument callable running one forward (no grad) or one training step (forward + backward)."""
    if pass_name == "forward":
        fusion.eval()

        def forward():
            with torch.no_grad():
                return fusion(*inputs)

        return forward
    fusion.train()

    def train_step():
        fusion.zero_grad(set_to_none=True)
        vision, text = fusion(*inputs)
        (vision.float().mean() + text.float().mean()).backward()

    return train_step


def warm_up(fusion: FusionEncoder, config: MPLUGConfig, vision_len: int, text_len: int, device) -> None:
    """One forward and one training step at batch 1, so the timed calls carry no one-time costs."""
    inputs = fusion_inputs(config, 1, vision_len, text_len, device, next(fusion.parameters()).dtype)
    for pass_name in PASSES:
        step_function(fusion, inputs, pass_name)()


def measure(fusion, config, variant, backend, batch, vision_len, text_len, pass_name, device, min_run_time) -> dict:
    """One row: ms per batch, ms per 100 samples, samples/s, peak memory (an out-of-memory pass is recorded)."""
    row = {"benchmark": "fusion", "variant": variant, "backend": backend, "pass": pass_name,
           "batch": batch, "vision_len": vision_len, "text_len": text_len,
           "gflops_per_sample": fusion_flops(config.replace(fusion=variant), vision_len, text_len) / 1e9}
    dtype = next(fusion.parameters()).dtype
    try:
        step = step_function(fusion, fusion_inputs(config, batch, vision_len, text_len, device, dtype), pass_name)
        ms = time_ms(step, device, min_run_time=min_run_time, warmed=True)
        row.update(ms=ms, ms_per_100=ms * 100 / batch, samples_per_s=batch / (ms * 1e-3),
                   peak_memory_mb=peak_memory_mb(step, device))
    except (RuntimeError, torch.cuda.OutOfMemoryError) as error:
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return row


def run(
    device: torch.device,
    config_name: str = "base",
    batch: Optional[int] = None,
    vision_lens: Sequence[int] = VISION_LENS,
    text_len: int = TEXT_LEN,
    backends: Optional[Sequence[str]] = None,
    variants: Sequence[str] = VARIANTS,
    passes: Sequence[str] = PASSES,
    min_run_time: float = 0.2,
) -> Tuple[List[dict], dict]:
    """(rows, extra JSON fields): every variant x backend x Lv x pass. CPU default batch 1, GPU 64."""
    config = CONFIGS[config_name]()
    dtype = bench_dtype(device)
    batch = batch or (64 if device.type == "cuda" else 1)
    names, skipped = fusion_backends(device, dtype, config, backends)
    rows = []
    bar = progress(list(itertools.product(variants, names, vision_lens, passes)), "fusion")
    for (variant, backend), cases in itertools.groupby(bar, key=lambda case: case[:2]):
        fusion = build_fusion(config, variant, backend, device, dtype)
        warm_up(fusion, config, min(vision_lens), text_len, device)
        for _, _, vision_len, pass_name in cases:
            bar.set_postfix_str(f"{variant} {backend} Lv={vision_len} {pass_name}")
            rows.append(measure(fusion, config, variant, backend, batch, vision_len, text_len, pass_name, device, min_run_time))
        del fusion
    extra = {
        "benchmark": "fusion",
        "config": config_name,
        "batch": batch,
        "text_len": text_len,
        "dtype": str(dtype).replace("torch.", ""),
        "masks": "all-True bool masks for vision and text, as the model passes them",
        "backend_labels": {name: BACKEND_LABELS.get(name, name) for name in names},
        "skipped_backends": skipped,
        "flop_ratios": flop_ratios(config, vision_lens, text_len),
        "paper_ms_per_100": PAPER_MS_PER_100,
    }
    return rows, extra
