"""What every benchmark report shares: reading result JSON (old names upgraded), table cells, figure helpers."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

from bench.common import Ratio

OUR_KERNELS = ("triton", "cuda")
RENAMED_VARIANTS = {"coattn": "two_way"}  # result files written before the rename (e.g. bench/results/cpu/fusion.json)


def _renamed(text: str) -> str:
    for old, new in RENAMED_VARIANTS.items():
        text = text.replace(old, new)
    return text


def upgrade_names(payload: dict) -> dict:
    """payload with the old variant name "coattn" read as "two_way" (rows, ratio names, FLOP-ratio and paper keys)."""
    for row in payload.get("rows", []):
        if "variant" in row:
            row["variant"] = RENAMED_VARIANTS.get(row["variant"], row["variant"])
    for ratio in payload.get("ratios", []):
        if "ratio" in ratio:
            ratio["ratio"] = _renamed(ratio["ratio"])
    for key in ("flop_ratios", "video_flop_ratios"):
        if key in payload:
            payload[key] = {lv: {_renamed(name): value for name, value in ratios.items()} for lv, ratios in payload[key].items()}
    if "paper_ms_per_100" in payload:
        payload["paper_ms_per_100"] = {_renamed(name): ms for name, ms in payload["paper_ms_per_100"].items()}
    return payload


def load(path) -> dict:
    """The JSON payload written by bench.common.write_results, old variant names upgraded."""
    return upgrade_names(json.loads(Path(path).read_text()))


def fmt(value, digits: int = 2) -> str:
    """A number for a table cell (no decimals from 1000 up); '-' for a missing one."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{0 if abs(value) >= 1000 else digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def environment_line(payload: dict) -> str:
    """One line: device label, date, commit, versions, load average before/after, noisy cells, wall time, command."""
    env = payload["environment"]
    label = env.get("label", env["device_type"].upper())
    device = env["device"] if env["device"].startswith(label) else f"{label}: {env['device']}"
    noisy = f"{env.get('noisy_cells')} of {env.get('cells')} cells noisy (spread > 20% of the median)"
    return (
        f"{device}, {env['date']}, commit {env['commit'][:10]}, "
        f"torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; load average {fmt(env.get('load_average_before'), 1)} "
        f"before, {fmt(env.get('load_average_after'), 1)} after; {noisy}; {fmt(env.get('wall_s'), 0)} s; command `{env['command']}`"
    )


def time_unit(ms_per_100: Sequence[float]) -> Tuple[str, float]:
    """(unit, factor from ms per 100 samples): 'ms/100 samples' while every value is below 1e5, else ms or s per sample."""
    largest = max(ms_per_100, default=0.0)
    if largest < 1e5:
        return "ms/100 samples", 1.0
    if largest / 100 < 1e5:
        return "ms/sample", 0.01
    return "s/sample", 1e-5


def timing_cell(row: Optional[dict], scale: float = 1.0, digits: int = 2) -> str:
    """'median [min-max]' of a timing row (times scale), with ' noisy' when its spread exceeds 20%."""
    if row is None:
        return "-"
    if "error" in row:
        return row["error"]
    noisy = " noisy" if row["noisy"] else ""
    return (f"{fmt(row['ms_median'] * scale, digits)} [{fmt(row['ms_min'] * scale, digits)}-"
            f"{fmt(row['ms_max'] * scale, digits)}]{noisy}")


def ratio_cell(ratio: Optional[dict]) -> str:
    """'median x [low-high]' of a ratio row, with ' noisy' when its spread exceeds 20%."""
    if ratio is None:
        return "-"
    noisy = " noisy" if ratio["noisy"] else ""
    return f"{ratio['ratio_median']:.2f}x [{ratio['ratio_low']:.2f}-{ratio['ratio_high']:.2f}]{noisy}"


def memory_cell(row: Optional[dict]) -> str:
    """Peak MiB of a timing row; 'not measured' where the method had no number."""
    if row is None or "error" in row:
        return "-"
    return "not measured" if row.get("peak_memory_mb") is None else fmt(row["peak_memory_mb"], 0)


def paired_samples_ratio(numerator: dict, denominator: dict) -> dict:
    """Ratio fields of two timing rows of one interleaved group, per round from their samples."""
    return Ratio([a / b for a, b in zip(numerator["samples_ms"], denominator["samples_ms"])]).row()


def model_label(row: dict) -> str:
    """A full-model row's name from the attention backends that actually ran (never "fused" when none of ours ran)."""
    ran: List[str] = row.get("attention_backends") or []
    names = "+".join(ran) or "no attention call seen"
    cache = "" if row.get("task") == "train_step" else (", KV cache" if row.get("setup") == "fused" else ", no KV cache")
    if row.get("setup") == "eager":
        return f"eager math ({names}){cache}"
    ours = [name for name in ran if name in OUR_KERNELS]
    who = f"our kernels ({names})" if ours else f"{names} (none of our kernels ran)"
    return f"{who}{cache}"


def new_figure(panels: int, width: float = 6.0):
    """(figure, list of panels side by side), drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, panels, figsize=(width * panels, 4.5), squeeze=False)
    return figure, axes[0]


def save_figure(figure, path: Path, title: str) -> Path:
    """Title, one legend outside the plotting area (right of the panels, never over data), PNG."""
    handles, labels = [], []
    for axis in figure.axes:
        for handle, label in zip(*axis.get_legend_handles_labels()):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    legend = figure.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=7)
    figure.tight_layout()
    heading = figure.suptitle(textwrap.fill(title, 160), fontsize=8, y=1.0, va="bottom")
    figure.savefig(path, dpi=110, bbox_inches="tight", bbox_extra_artists=[legend, heading])
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path


def error_bars(axis, points: List[Tuple[float, float, float, float, bool]], **style) -> None:
    """Medians with low-high error bars from (x, median, low, high, noisy) points; noisy points ringed in red."""
    points = sorted(points)
    xs = [p[0] for p in points]
    medians = [p[1] for p in points]
    spans = [[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]]
    axis.errorbar(xs, medians, yerr=spans, capsize=3, **style)
    noisy = [(p[0], p[1]) for p in points if p[4]]
    if noisy:
        axis.scatter(*zip(*noisy), s=120, facecolors="none", edgecolors="red", linewidths=1.5, zorder=5,
                     label="noisy (spread > 20% of median)")


def timing_points(rows: List[dict], x_key: str, scale: float) -> List[Tuple[float, float, float, float, bool]]:
    """error_bars points of timing rows: (row[x_key], median, min, max times scale, noisy)."""
    return [(r[x_key], r["ms_median"] * scale, r["ms_min"] * scale, r["ms_max"] * scale, r["noisy"]) for r in rows]
