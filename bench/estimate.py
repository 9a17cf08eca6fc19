"""ESTIMATE, not a measurement: the CUDA forward's modelled time where users run it (``python -m bench.static
--estimate``), from occupancy.split_cost, the one model split_plan chooses by (its docstring states it).

Shapes: co-attention Lq = 25 over Lk = 577 at B = 1, 8, 64 and the connected layer Lq = Lk = 602 at B = 1-8;
H = 12, D = 64, bf16, sm_90 CTAs per SM of the CUDA forward (occupancy.default_ctas_per_sm). Per GPU (H100:
3.35 TB/s, H200: 4.8 TB/s, 132 SMs each): split plan, CTAs, waves, key tiles per CTA, HBM bytes (Q, K/V, output,
fp32 partials written and read) -> ESTIMATE microseconds and % of HBM bandwidth. At B = 1, Lq = 25 the old plan
(10 splits of 64 keys) is modelled beside split_plan's.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from mplug_kernels.occupancy import default_ctas_per_sm, forward_rows_per_cta, split_cost, split_plan

GPUS = {"H100": (3.35e12, 132), "H200": (4.8e12, 132)}
HEADS, HEAD_DIM, ELEMENT_BYTES, ARCH = 12, 64, 2, 90
SHAPES = [(batch, 25, 577) for batch in (1, 8, 64)] + [(batch, 602, 602) for batch in (1, 2, 4, 8)]
OLD_PLAN = (10, 64)  # before split_plan: 10 splits of 64 keys at B = 1, Lq = 25, Lk = 577 (the last one 1 key)
LABEL = "ESTIMATE (model occupancy.split_cost, not measured)"


def estimate(gpu: str, batch: int, q_len: int, k_len: int, plan: Optional[Tuple[int, int]] = None) -> dict:
    """One ESTIMATE row of the CUDA forward of q [batch, q_len, 12, 64] bf16 over k_len keys on `gpu`."""
    bandwidth, sms = GPUS[gpu]
    per_sm = default_ctas_per_sm("cuda", ARCH, q_len, HEAD_DIM, ELEMENT_BYTES)
    model = dict(rows_per_cta=forward_rows_per_cta("cuda", q_len, HEAD_DIM, ELEMENT_BYTES), ctas_per_sm=per_sm,
                 sm_count=sms, bandwidth=bandwidth)
    chosen = plan or split_plan(batch, HEADS, q_len, k_len, HEAD_DIM, ELEMENT_BYTES, backend="cuda", arch=ARCH,
                                sm_count=sms, ctas_per_sm=per_sm, bandwidth=bandwidth)
    cost = split_cost(batch, HEADS, q_len, k_len, HEAD_DIM, ELEMENT_BYTES, *chosen, **model)
    q_and_out = 2 * batch * HEADS * q_len * HEAD_DIM * ELEMENT_BYTES
    moved = cost.kv_bytes + cost.partial_bytes + q_and_out
    return {"label": LABEL, "gpu": gpu, "batch": batch, "q_len": q_len, "k_len": k_len,
            "plan": "old" if plan else "split_plan", "num_splits": cost.num_splits, "split_size": cost.split_size,
            "ctas": cost.ctas, "waves": cost.waves, "tiles_per_cta": cost.tiles_per_cta, "bytes": moved,
            "estimate_us": round(cost.seconds * 1e6, 2),
            "estimate_hbm_percent": round(100 * moved / cost.seconds / bandwidth, 1)}


def estimate_rows() -> List[dict]:
    """Every ESTIMATE row: each GPU and shape with split_plan's plan, and the old plan at B = 1, Lq = 25."""
    rows = []
    for gpu in GPUS:
        for batch, q_len, k_len in SHAPES:
            if (batch, q_len) == (1, 25):
                rows.append(estimate(gpu, batch, q_len, k_len, OLD_PLAN))
            rows.append(estimate(gpu, batch, q_len, k_len))
    return rows


def estimate_table(rows: List[dict]) -> str:
    """The rows as a markdown table headed by the ESTIMATE label and the model."""
    header = ["gpu", "B", "Lq", "Lk", "plan", "splits x keys", "CTAs", "waves", "tiles/CTA", "MB moved",
              "ESTIMATE us", "ESTIMATE % HBM"]
    lines = [f"{LABEL}. Model: waves of CTAs/SM x SMs, each CTA_START_S + tiles x max(TILE_LATENCY_S, the "
             "wave's K/V tile bytes / HBM bandwidth); a split plan adds its fp32 partials and COMBINE_START_S.",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["gpu"], r["batch"], r["q_len"], r["k_len"], r["plan"], f"{r['num_splits']} x {r['split_size']}",
                 r["ctas"], r["waves"], r["tiles_per_cta"], f"{r['bytes'] / 1e6:.2f}", r["estimate_us"],
                 r["estimate_hbm_percent"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
