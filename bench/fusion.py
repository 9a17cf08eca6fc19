"""The paper's efficiency claim: the fusion network of mPLUG in its three variants, on every attention backend.

Variants (mplug.MPLUGConfig.fusion): "skip" (the paper's skip-connected network), "connected" (connected
attention over [v; t] in every layer) and "two_way" (co-attention in both directions). Passes: "forward"
(eval, no grad) and "train" (forward + backward of a scalar loss, dropout on; no optimizer update).
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import Timing, TimingPolicy, bench_dtype, measure, paired_ratio, progress
from bench.fusion_report import PAPER_MS_PER_100
from mplug import MPLUGConfig
from mplug.model.fusion import FusionEncoder
from mplug_kernels.backends import BACKENDS, AttentionCall

VARIANTS = ("skip", "connected", "two_way")
FUSION_BACKENDS = ("reference", "sdpa", "triton", "cuda")
BACKEND_LABELS = {
    "reference": "eager math (reference backend)",
    "sdpa": "sdpa",
    "triton": "triton (ours)",
    "cuda": "cuda (ours)",
}
VISION_LENS = (257, 577, 901, 1025)
VIDEO_FRAMES = (8, 16)  # the video row: T frames at image 224, their tokens one vision memory (mplug.tasks.video)
VIDEO_IMAGE_SIZE = 224
TEXT_LEN = 25
GPU_BATCH, CPU_BATCH = 64, 1
PASSES = ("forward", "train")
CONFIGS = {"base": MPLUGConfig.base, "large": MPLUGConfig.large, "tiny": MPLUGConfig.tiny}


def video_vision_lens(config: MPLUGConfig) -> Tuple[int, ...]:
    """Lv of the video row: VIDEO_FRAMES x ((VIDEO_IMAGE_SIZE / patch) ** 2 + 1) tokens (1576, 3152 for base)."""
    return tuple(frames * ((VIDEO_IMAGE_SIZE // config.patch_size) ** 2 + 1) for frames in VIDEO_FRAMES)


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
        if config.fusion == "two_way":
            macs += _co_attention_layer_macs(config, vision_len, text_len, False)
    return 2 * macs


def flop_ratios(config: MPLUGConfig, vision_lens: Sequence[int], text_len: int) -> Dict[str, Dict[str, float]]:
    """Same-backend FLOP ratios connected/skip and two_way/skip per Lv, with projected and with absorbed K/V in skip."""
    flops = {variant: config.replace(fusion=variant) for variant in VARIANTS}
    ratios = {}
    for vision_len in vision_lens:
        counts = {variant: fusion_flops(cfg, vision_len, text_len) for variant, cfg in flops.items()}
        skip_absorbed = fusion_flops(flops["skip"], vision_len, text_len, absorbed_kv=True)
        ratios[str(vision_len)] = {
            "skip_gflops": counts["skip"] / 1e9,
            "connected_gflops": counts["connected"] / 1e9,
            "two_way_gflops": counts["two_way"] / 1e9,
            "connected_over_skip": counts["connected"] / counts["skip"],
            "two_way_over_skip": counts["two_way"] / counts["skip"],
            "connected_over_skip_absorbed": counts["connected"] / skip_absorbed,
            "two_way_over_skip_absorbed": counts["two_way"] / skip_absorbed,
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


def use_backend(fusion: FusionEncoder, backend: str) -> None:
    """Switch every attention layer of fusion to backend (what MPLUG.set_attn_backend does for the whole model)."""
    for module in fusion.modules():
        if hasattr(module, "backend"):
            module.backend = backend


def fusion_inputs(config: MPLUGConfig, batch: int, vision_len: int, text_len: int, device, dtype):
    """(image_embeds, image_mask, text_embeds, text_mask): random features, all-True bool masks as in the model."""
    generator = torch.Generator(device="cpu").manual_seed(1)
    vision = torch.randn(batch, vision_len, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    text = torch.randn(batch, text_len, config.hidden_size, generator=generator).to(device=device, dtype=dtype)
    ones = lambda length: torch.ones(batch, length, dtype=torch.bool, device=device)  # noqa: E731
    return vision, ones(vision_len), text, ones(text_len)


def step_function(fusion: FusionEncoder, inputs, pass_name: str, backend: Optional[str] = None) -> Callable[[], object]:
    """A zero-argument callable running one forward (eval, no grad) or one training step (forward + backward),
    switching fusion to backend first when one is given (so calls on several backends can interleave)."""

    def prepare():
        if backend is not None:
            use_backend(fusion, backend)
        fusion.train(pass_name == "train")

    def forward():
        prepare()
        with torch.no_grad():
            return fusion(*inputs)

    def train_step():
        prepare()
        vision, text = fusion(*inputs)
        (vision.float().mean() + text.float().mean()).backward()
        fusion.zero_grad(set_to_none=True)  # every call starts without gradients: its peak memory holds a full set

    return forward if pass_name == "forward" else train_step


def _cell_row(config: MPLUGConfig, key: Tuple[str, str], timing: Timing, batch, vision_len, text_len, pass_name) -> dict:
    """One timing row: the cell, its timing fields and the same per 100 samples."""
    variant, backend = key
    row = {"benchmark": "fusion", "variant": variant, "backend": backend, "pass": pass_name, "batch": batch,
           "vision_len": vision_len, "text_len": text_len,
           "gflops_per_sample": fusion_flops(config.replace(fusion=variant), vision_len, text_len) / 1e9, **timing.row()}
    if timing.error is None:
        per_100 = 100 / batch
        row.update(ms_per_100_median=row["ms_median"] * per_100, ms_per_100_min=row["ms_min"] * per_100,
                   ms_per_100_max=row["ms_max"] * per_100, samples_per_s=batch / (row["ms_median"] * 1e-3))
    return row


def _ratio_rows(timings: Dict[Tuple[str, str], Timing], pass_name: str, vision_len: int) -> List[dict]:
    """Per-round ratios of one (pass, Lv) group: connected/skip and two_way/skip per backend, backend/sdpa per variant."""
    pairs = [(f"{variant}/skip", (variant, backend), ("skip", backend), {"backend": backend})
             for variant, backend in timings if variant != "skip" and ("skip", backend) in timings]
    pairs += [(f"{backend}/sdpa", (variant, backend), (variant, "sdpa"), {"variant": variant})
              for variant, backend in timings if backend != "sdpa" and (variant, "sdpa") in timings]
    rows = []
    for name, numerator, denominator, fields in pairs:
        ratio = paired_ratio(timings[numerator], timings[denominator])
        if ratio is not None:
            rows.append({"benchmark": "fusion", "ratio": name, "pass": pass_name, "vision_len": vision_len, **fields, **ratio.row()})
    return rows


def run(
    device: torch.device,
    policy: TimingPolicy,
    config_name: str = "base",
    batch: Optional[int] = None,
    vision_lens: Sequence[int] = VISION_LENS,
    text_len: int = TEXT_LEN,
    backends: Optional[Sequence[str]] = None,
    variants: Sequence[str] = VARIANTS,
    passes: Sequence[str] = PASSES,
    after_group: Optional[Callable[[List[dict], List[dict], dict], None]] = None,
    groups: Optional[Sequence[Tuple[str, int]]] = None,
) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields): every variant x backend x Lv x pass. CPU default batch 1, GPU 64.

    groups: the (pass, Lv) pairs to time (default: every pass x every Lv).

    The variants and backends of one (pass, Lv) are timed interleaved (one network per variant, switched
    between backends), so their ratios are paired per round. after_group(rows, ratios, extra) is called after
    every (pass, Lv) group with the results so far (the main job writes them, so a stopped run keeps them).
    """
    config = CONFIGS[config_name]()
    dtype = bench_dtype(device)
    batch = batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    names, skipped = fusion_backends(device, dtype, config, backends)
    extra = {
        "benchmark": "fusion",
        "config": config_name,
        "batch": batch,
        "text_len": text_len,
        "dtype": str(dtype).replace("torch.", ""),
        "masks": "all-True bool masks for vision and text, as the model passes them",
        "resolved_backends": names,
        "backend_labels": {name: BACKEND_LABELS.get(name, name) for name in names},
        "skipped_backends": skipped,
        "flop_ratios": flop_ratios(config, vision_lens, text_len),
        "video_flop_ratios": {f"T={frames}": ratios for frames, ratios in zip(
            VIDEO_FRAMES, flop_ratios(config, video_vision_lens(config), text_len).values())},
        "paper_ms_per_100": PAPER_MS_PER_100,
    }
    networks = {variant: build_fusion(config, variant, names[0], device, dtype) for variant in variants}
    rows, ratios = [], []
    for pass_name, vision_len in progress(list(groups or itertools.product(passes, vision_lens)), "fusion"):
        inputs = fusion_inputs(config, batch, vision_len, text_len, device, dtype)
        functions = {(variant, backend): step_function(networks[variant], inputs, pass_name, backend)
                     for variant in variants for backend in names}
        timings = measure(functions, device, policy)
        rows += [_cell_row(config, key, timing, batch, vision_len, text_len, pass_name) for key, timing in timings.items()]
        ratios += _ratio_rows(timings, pass_name, vision_len)
        if after_group is not None:
            after_group(rows, ratios, extra)
    return rows, ratios, extra
