"""ESTIMATE, not a measurement: the CUDA forward's modelled time where users run it (``python -m bench.static
--estimate``), from occupancy.split_cost, the one model split_plan chooses by (its docstring states it), and a
compute side and the combine's latency, which split_cost leaves out (the connected layer is compute-bound).

Shapes: co-attention Lq = 25 over Lk = 577 at B = 1, 8, 64 and the connected layer Lq = Lk = 602 at B = 1-8;
H = 12, D = 64, bf16, sm_90 CTAs per SM of the CUDA forward (occupancy.default_ctas_per_sm). Per GPU (H100:
3.35 TB/s, H200: 4.8 TB/s, 132 SMs each): split plan, CTAs, waves, key tiles per CTA, HBM bytes (Q, K/V, output,
fp32 partials written and read) -> ESTIMATE microseconds and % of HBM bandwidth.

Old rows (plan "old", at B = 1) model the code when issue 20 was filed, beside today's: 64-row CTAs (32-row up to
Lq = 32), the split count of num_splits_for_occupancy (old_split_count) over 64-key splits, and a combine that
used each split's lse and partial as soon as it loaded them (2 dependent L2 round trips per split).

Compute side: CTAs spread evenly over the SMs; the busiest SM runs ceil(CTAs / SMs) CTAs, each key tile of a CTA
taking the longer of its MMAs (4 x rows per CTA x 64 keys x D flops at the GPU's mma.sync rate over its SMs) and
its ldmatrix reads (every warp reads the whole K and V tile: warps x 2 x 64 x D x 2 bytes at SMEM_BYTES_PER_SM_S).
The ESTIMATE is the longer of split_cost's time and CTA_START_S plus that compute time, plus the combine's
dependent L2 round trips (combine_round_trips x L2_ROUND_TRIP_S). K/V reads: how often each (b, h)'s keys are read
from L2 into shared memory (query tiles per (b, h), ceil(Lq / rows per CTA)).
"""
from __future__ import annotations

from typing import List, Optional, Tuple

from mplug_kernels.occupancy import (CTA_START_S, KEY_TILE, MAX_SPLITS, TIME_TOLERANCE, SplitCost,
                                     default_ctas_per_sm, forward_rows_per_cta, split_cost, split_plan)

GPUS = {"H100": (3.35e12, 132), "H200": (4.8e12, 132)}
# Assumptions, not measurements: dense bf16 mma.sync rate (about 2/3 of the 989 TFLOP/s tensor peak, which only
# wgmma reaches) and shared-memory bandwidth of 128 bytes per clock per SM at 1.83 GHz.
MMA_SYNC_FLOPS = {"H100": 660e12, "H200": 660e12}
SMEM_BYTES_PER_SM_S = 128 * 1.83e9
HEADS, HEAD_DIM, ELEMENT_BYTES, ARCH = 12, 64, 2, 90
SHAPES = [(batch, 25, 577) for batch in (1, 8, 64)] + [(batch, 602, 602) for batch in (1, 2, 4, 8)]
# Assumption: one dependent load that hits L2, about 370 clocks at 1.83 GHz (of the order of published H100 L2-hit
# latencies; not measured here).
L2_ROUND_TRIP_S = 0.2e-6
COMBINE_BATCH = 8  # csrc/combine.cuh kCombineBatch: the splits whose partial chunks are in flight at once
LABEL = "ESTIMATE (model occupancy.split_cost, not measured)"


def old_split_count(ctas: int, ctas_per_sm: int, sm_count: int, key_tiles: int) -> int:
    """The split count before split_plan (num_splits_for_occupancy): the counts that cut the key tiles evenly, at
    most MAX_SPLITS, each costing ceil(CTAs x splits / wave) waves x ceil(key tiles / splits) tiles; the fewest
    within TIME_TOLERANCE of the best."""
    if ctas <= 0 or key_tiles <= 1:
        return 1
    wave = max(1, ctas_per_sm) * sm_count
    candidates = sorted({-(-key_tiles // -(-key_tiles // s)) for s in range(1, min(MAX_SPLITS, key_tiles) + 1)})
    time = {s: -(-ctas * s // wave) * -(-key_tiles // s) for s in candidates}
    return next(s for s in candidates if time[s] <= TIME_TOLERANCE * min(time.values()))


def combine_round_trips(num_splits: int, old: bool) -> int:
    """Dependent L2 round trips of one combine warp: none without splits; 2 per split in the old combine (each load
    used at once); else the lse loads, then one per COMBINE_BATCH splits of partial chunks (csrc/combine.cuh)."""
    if num_splits == 1:
        return 0
    return 2 * num_splits if old else 1 + -(-num_splits // COMBINE_BATCH)


def compute_seconds(gpu: str, cost: SplitCost, rows_per_cta: int) -> float:
    """CTA_START_S plus the busiest SM's MMA or ldmatrix time (the longer, per key tile) of the CTAs of `cost`."""
    sms = GPUS[gpu][1]
    warps = min(4, rows_per_cta // 16)
    mma_s = 4 * rows_per_cta * KEY_TILE * HEAD_DIM / (MMA_SYNC_FLOPS[gpu] / sms)
    ldmatrix_s = warps * 2 * KEY_TILE * HEAD_DIM * ELEMENT_BYTES / SMEM_BYTES_PER_SM_S
    return CTA_START_S + -(-cost.ctas // sms) * cost.tiles_per_cta * max(mma_s, ldmatrix_s)


def estimate(gpu: str, batch: int, q_len: int, k_len: int, old: bool = False) -> dict:
    """One ESTIMATE row of the CUDA forward of q [batch, q_len, 12, 64] bf16 over k_len keys on `gpu`: today's code,
    or (old) the code when issue 20 was filed (the module docstring says what differs)."""
    bandwidth, sms = GPUS[gpu]
    if old:
        rows = 32 if q_len <= 32 else 64
    else:
        rows = forward_rows_per_cta("cuda", q_len, HEAD_DIM, ELEMENT_BYTES)
    per_sm = default_ctas_per_sm("cuda", ARCH, q_len, HEAD_DIM, ELEMENT_BYTES, rows_per_cta=rows)
    model = dict(rows_per_cta=rows, ctas_per_sm=per_sm, sm_count=sms, bandwidth=bandwidth)
    if old:
        key_tiles = -(-k_len // KEY_TILE)
        splits = old_split_count(batch * HEADS * -(-q_len // rows), per_sm, sms, key_tiles)
        chosen = (splits, -(-key_tiles // splits) * KEY_TILE)
    else:
        chosen = split_plan(batch, HEADS, q_len, k_len, HEAD_DIM, ELEMENT_BYTES, backend="cuda", arch=ARCH,
                            sm_count=sms, ctas_per_sm=per_sm, bandwidth=bandwidth)
    cost = split_cost(batch, HEADS, q_len, k_len, HEAD_DIM, ELEMENT_BYTES, *chosen, **model)
    compute = compute_seconds(gpu, cost, rows)
    seconds = max(cost.seconds, compute) + combine_round_trips(cost.num_splits, old) * L2_ROUND_TRIP_S
    q_and_out = 2 * batch * HEADS * q_len * HEAD_DIM * ELEMENT_BYTES
    moved = cost.kv_bytes + cost.partial_bytes + q_and_out
    return {"label": LABEL, "gpu": gpu, "batch": batch, "q_len": q_len, "k_len": k_len,
            "plan": "old" if old else "split_plan", "num_splits": cost.num_splits, "split_size": cost.split_size,
            "rows_per_cta": rows, "ctas": cost.ctas, "waves": cost.waves, "tiles_per_cta": cost.tiles_per_cta,
            "kv_reads": -(-q_len // rows), "bound": "compute" if compute > cost.seconds else "memory",
            "bytes": moved, "estimate_us": round(seconds * 1e6, 2),
            "estimate_hbm_percent": round(100 * moved / seconds / bandwidth, 1)}


def estimate_rows() -> List[dict]:
    """Every ESTIMATE row: each GPU and shape with today's code, the old code's row before it at B = 1."""
    rows = []
    for gpu in GPUS:
        for batch, q_len, k_len in SHAPES:
            if batch == 1:
                rows.append(estimate(gpu, batch, q_len, k_len, old=True))
            rows.append(estimate(gpu, batch, q_len, k_len))
    return rows


def estimate_table(rows: List[dict]) -> str:
    """The rows as a markdown table headed by the ESTIMATE label and the model."""
    header = ["gpu", "B", "Lq", "Lk", "plan", "splits x keys", "rows/CTA", "CTAs", "waves", "tiles/CTA",
              "K/V reads", "MB moved", "bound", "ESTIMATE us", "ESTIMATE % HBM"]
    lines = [f"{LABEL}. Model: the longer of (memory) waves of CTAs/SM x SMs, each CTA_START_S + tiles x "
             "max(TILE_LATENCY_S, the wave's K/V tile bytes / HBM bandwidth), a split plan adding its fp32 partials "
             "and COMBINE_START_S; and (compute) CTA_START_S + the busiest SM's CTAs x tiles x max(MMA time at "
             "660 TFLOP/s mma.sync, ldmatrix bytes at 128 B/clock/SM, 1.83 GHz); plus the combine's dependent L2 "
             "round trips at 0.2 us (2 per split in the old code). Old: the code when issue 20 was filed.",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [r["gpu"], r["batch"], r["q_len"], r["k_len"], r["plan"], f"{r['num_splits']} x {r['split_size']}",
                 r["rows_per_cta"], r["ctas"], r["waves"], r["tiles_per_cta"], r["kv_reads"], f"{r['bytes'] / 1e6:.2f}",
                 r["bound"], r["estimate_us"], r["estimate_hbm_percent"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines)
