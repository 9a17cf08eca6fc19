"""The main job's fusion results at a glance: what was measured, a verdict line, the table and the two-panel plot."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from bench.tables import (
    environment_line, error_bars, fmt, markdown_table, memory_cell, new_figure, paired_samples_ratio, ratio_cell,
    save_figure, time_unit, timing_cell, timing_points,
)

PAPER_MS_PER_100 = {"skip": 410.0, "connected": 1650.0, "two_way": 1860.0}  # Figure 1 of arXiv 2205.12005, read off
VARIANTS = ("skip", "connected", "two_way")
RATIOS = ("connected/skip", "two_way/skip")
MOSTLY_NOISY = 0.5
LINE_STYLES = ("-", "--", ":", "-.")
PASS_MARKERS = {"forward": "o", "train": "s"}


def paper_ratio(name: str) -> float:
    """The paper's Figure 1 ratio for 'variant/skip'."""
    variant, base = name.split("/")
    return PAPER_MS_PER_100[variant] / PAPER_MS_PER_100[base]


def what_was_measured(payload: dict) -> str:
    """On a CPU: that our Triton/CUDA kernels do not run, and what the rows time instead ('' on a GPU)."""
    if payload["environment"].get("device_type") != "cpu":
        return ""
    backends = ", ".join(payload.get("resolved_backends", []))
    return ("On a CPU our Triton and CUDA kernels do not run (Triton only under its interpreter, which is not a "
            f"performance measurement): these rows time the three fusion networks on PyTorch attention ({backends}), "
            "i.e. the cost of the architecture that the paper's claim is about, not the speed of our kernels.")


def verdict(payload: dict) -> str:
    """One line: 'rerun on an idle machine' when most cells are noisy, else the measured ratios against the paper's."""
    env = payload["environment"]
    cells, noisy = env.get("cells") or 0, env.get("noisy_cells") or 0
    load = f"load average {fmt(env.get('load_average_before'), 1)} before, {fmt(env.get('load_average_after'), 1)} after"
    if cells and noisy / cells > MOSTLY_NOISY:
        return (f"Verdict: {noisy} of {cells} cells are noisy (spread > 20% of the median; {load} on "
                f"{env.get('device')}): the machine was busy, rerun on an idle machine before reading any ratio.")
    parts = []
    for name in RATIOS:
        medians = [r["ratio_median"] for r in payload.get("ratios", []) if r.get("ratio") == name]
        if medians:
            flops = [lv[name.replace("/", "_over_")] for lv in payload.get("flop_ratios", {}).values()]
            flop_text = f", FLOP ratio {min(flops):.2f}-{max(flops):.2f}x" if flops else ""
            parts.append(f"{name} {min(medians):.2f}-{max(medians):.2f}x (paper ~{paper_ratio(name):.1f}x{flop_text})")
    if not parts:
        return "Verdict: no variant ratio was measured."
    return f"Verdict: {'; '.join(parts)} over the measured cells ({noisy} of {cells} noisy; {load})."


def _index(payload: dict) -> Dict[tuple, dict]:
    return {(r["pass"], r["vision_len"], r["backend"], r["variant"]): r for r in payload["rows"]}


def _ratio_index(payload: dict) -> Dict[tuple, dict]:
    return {(r.get("ratio"), r.get("pass"), r.get("vision_len"), r.get("backend")): r for r in payload.get("ratios", [])}


def _backend_label(payload: dict, backend: str) -> str:
    return payload.get("backend_labels", {}).get(backend, backend)


def fusion_unit(payload: dict):
    """(unit, factor from ms per call): ms per 100 samples, or per sample once that passes 1e5."""
    per_100 = 100 / payload["batch"]
    unit, factor = time_unit([r["ms_median"] * per_100 for r in payload["rows"] if "error" not in r])
    return unit, per_100 * factor


def fusion_table(payload: dict) -> str:
    """What was measured, the verdict, then a markdown table: time per variant, paired ratios, FLOP ratios, the paper."""
    index, ratios = _index(payload), _ratio_index(payload)
    flop_ratios = payload.get("flop_ratios", {})
    unit, scale = fusion_unit(payload)
    header = ["pass", "Lv", "backend", *(f"{variant} {unit}" for variant in VARIANTS), "peak MiB skip/conn/two_way",
              *RATIOS, *(f"FLOP ratio {name}" for name in RATIOS)]
    body = []
    for pass_name, vision_len, backend in sorted({key[:3] for key in index}):
        cells = {variant: index.get((pass_name, vision_len, backend, variant)) for variant in VARIANTS}
        flops = flop_ratios.get(str(vision_len), {})
        body.append([
            pass_name, vision_len, _backend_label(payload, backend),
            *(timing_cell(cells[variant], scale, 0 if unit.startswith("ms/100") else 1) for variant in VARIANTS),
            "/".join(memory_cell(cell) for cell in cells.values()),
            *(ratio_cell(ratios.get((name, pass_name, vision_len, backend))) for name in RATIOS),
            *(fmt(flops.get(name.replace("/", "_over_"))) + "x" if flops else None for name in RATIOS),
        ])
    paper_scale = scale * payload["batch"] / 100
    digits = 0 if unit.startswith("ms/100") else 1
    paper = ", ".join(f"{variant} {fmt(ms * paper_scale, digits)}" for variant, ms in PAPER_MS_PER_100.items())
    paper_line = (f"paper (Figure 1, approximate, the authors' hardware): {paper} {unit} -> "
                  + ", ".join(f"{name} {paper_ratio(name):.1f}x" for name in RATIOS))
    setup = (f"fusion network of mPLUG {payload.get('config')}, Lt={payload.get('text_len')}, batch {payload.get('batch')}, "
             f"{payload.get('dtype')}, backends {', '.join(payload.get('resolved_backends', []))}; {environment_line(payload)}")
    legend = (f"{unit}: median [min-max] over the repeats; ratios per round from paired (interleaved) samples, "
              "median [min-max]; noisy = spread > 20% of the median")
    absorbed = "\n".join(
        f"- Lv={lv}: FLOP ratios with absorbed cross-attention K/V: connected/skip {r['connected_over_skip_absorbed']:.2f}x, "
        f"two_way/skip {r['two_way_over_skip_absorbed']:.2f}x" for lv, r in flop_ratios.items()
    )
    skipped = "".join(f"\n- {name} skipped: {why}" for name, why in payload.get("skipped_backends", {}).items())
    measured = what_was_measured(payload)
    intro = "\n\n".join(part for part in (measured, verdict(payload)) if part)
    return (f"{setup}\n\n{intro}\n\n{markdown_table(header, body)}\n\n{legend}\n\n{paper_line}\n{absorbed}{skipped}\n\n"
            f"{target_lines(payload)}")


def target_lines(payload: dict) -> str:
    """The issue's performance-target comparisons at Lv = 577 from measured rows (no pass/fail on the CPU)."""
    index = {key: row for key, row in _index(payload).items() if "error" not in row}
    kernels = [b for b in ("cuda", "triton") if ("forward", 577, b, "skip") in index]
    if not kernels or ("forward", 577, "sdpa", "connected") not in index:
        return "target comparisons at Lv=577 need the triton or cuda backend and sdpa (not measured here)"
    fused = min(kernels, key=lambda b: index[("forward", 577, b, "skip")]["ms_median"])
    lines = [f"targets at Lv=577 (fused = {fused}; H100 targets 4.5x, 5.5x, 1.5x; measured on {payload['environment']['device']}):"]
    for pass_name, variant, target in (("forward", "connected", 4.5), ("forward", "two_way", 5.5), ("train", "skip", 1.5)):
        fused_row, sdpa_row = index.get((pass_name, 577, fused, "skip")), index.get((pass_name, 577, "sdpa", variant))
        if fused_row and sdpa_row:
            ratio = ratio_cell(paired_samples_ratio(sdpa_row, fused_row))
            lines.append(f"- {pass_name}: {variant} on sdpa / fused skip = {ratio} (target {target}x)")
    return "\n".join(lines)


def _plot_ratios(axis, payload: dict) -> None:
    """Left panel: measured ratios (median, min-max) per backend and pass, the FLOP ratios and the paper's ratios."""
    backends = sorted({r["backend"] for r in payload["rows"]})
    series: Dict[tuple, List[tuple]] = defaultdict(list)
    for r in payload.get("ratios", []):
        if r.get("ratio") in RATIOS:
            point = (r["vision_len"], r["ratio_median"], r["ratio_low"], r["ratio_high"], r["noisy"])
            series[(r["ratio"], r["backend"], r["pass"])].append(point)
    for (name, backend, pass_name), points in sorted(series.items()):
        error_bars(axis, points, color=f"C{RATIOS.index(name)}", marker=PASS_MARKERS.get(pass_name, "^"),
                   linestyle=LINE_STYLES[backends.index(backend) % len(LINE_STYLES)],
                   label=f"measured {name}, {_backend_label(payload, backend)}, {pass_name}")
    flop_ratios = payload.get("flop_ratios", {})
    lens = sorted(int(lv) for lv in flop_ratios)
    for number, name in enumerate(RATIOS):
        key = name.replace("/", "_over_")
        if lens:
            axis.plot(lens, [flop_ratios[str(lv)][key] for lv in lens], color=f"C{number}", linewidth=4, alpha=0.3,
                      label=f"FLOP ratio {name} (same backend)")
        axis.axhline(paper_ratio(name), color=f"C{number}", linestyle=":", linewidth=1.2,
                     label=f"paper, Figure 1: {name} ~{paper_ratio(name):.1f}x")
    axis.axhline(1.0, color="grey", linewidth=0.8)
    axis.set(xlabel="Lv (visual tokens)", ylabel="time ratio to the skip-connected network",
             title="cost relative to skip (paper: ~4x)")
    axis.grid(alpha=0.3)


def _plot_times(axis, payload: dict) -> None:
    """Right panel: absolute time per variant, backend and pass on this device only (no reference lines)."""
    unit, scale = fusion_unit(payload)
    backends = sorted({r["backend"] for r in payload["rows"]})
    series: Dict[tuple, List[dict]] = defaultdict(list)
    for row in payload["rows"]:
        if "error" not in row:
            series[(row["variant"], row["backend"], row["pass"])].append(row)
    for (variant, backend, pass_name), rows in sorted(series.items()):
        error_bars(axis, timing_points(rows, "vision_len", scale), color=f"C{VARIANTS.index(variant) + 2}",
                   marker=PASS_MARKERS.get(pass_name, "^"), linestyle=LINE_STYLES[backends.index(backend) % len(LINE_STYLES)],
                   label=f"{variant}, {_backend_label(payload, backend)}, {pass_name}")
    axis.set(xlabel="Lv (visual tokens)", ylabel=f"{unit} (median, min-max)", yscale="log",
             title=f"absolute time on {payload['environment']['device']} (batch {payload.get('batch')})")
    axis.grid(alpha=0.3)


def plot_fusion(payload: dict, path) -> Path:
    """PNG, two panels: the ratios against the paper's and the FLOP ratios; the absolute times on this device."""
    figure, (ratios, times) = new_figure(2, width=6.5)
    _plot_ratios(ratios, payload)
    _plot_times(times, payload)
    title = f"{verdict(payload)}\n{environment_line(payload)}"
    return save_figure(figure, Path(path), title)

