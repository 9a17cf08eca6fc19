"""The ESTIMATE of bench/estimate.py beside the measured CUDA forward of the same shapes, for a GPU run.

    python -m bench.estimate_vs_measured ESTIMATE_JSON MEASURED_JSON... [--json PATH]

ESTIMATE_JSON is what ``python -m bench.static --estimate --json PATH`` writes; each MEASURED_JSON is a benchmark
result (bench.bench_co_attention, bench.bench_concat_attention) timed on an H100 or H200. A row pairs split_plan's
estimate for that GPU with the median forward time of backend cuda (bfloat16, H = 12, D = 64) at the same batch,
Lq and Lk: estimated us, measured us and measured / estimated. Shapes measured but not estimated (or the
reverse) are left out. gpu_check.sh prints this table after its benchmarks.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from bench.estimate import GPUS, HEAD_DIM, HEADS

Key = Tuple[int, int, int]  # (batch, q_len, k_len)


def gpu_of(device_name: str) -> Optional[str]:
    """The estimate's GPU name ("H100", "H200") that a device name contains, else None."""
    return next((gpu for gpu in GPUS if gpu in device_name), None)


def measured_forward_us(result: dict, backend: str = "cuda") -> Dict[Key, float]:
    """{(batch, q_len, k_len): median forward microseconds} of `backend`'s bfloat16 H = 12, D = 64 rows of one
    benchmark result (rows with an error are skipped)."""
    found = {}
    for row in result.get("rows", []):
        if (row.get("backend") == backend and row.get("pass") == "fwd" and "ms_median" in row
                and row.get("dtype") == "bfloat16" and row.get("heads") == HEADS and row.get("head_dim") == HEAD_DIM):
            found[(row["batch"], row["q_len"], row["k_len"])] = row["ms_median"] * 1e3
    return found


def side_by_side(estimate_rows: Sequence[dict], measured: Dict[Key, float], gpu: str) -> List[dict]:
    """One row per shape that split_plan's estimate for `gpu` and the measurement both hold."""
    rows = []
    for row in estimate_rows:
        key = (row["batch"], row["q_len"], row["k_len"])
        if row["gpu"] != gpu or row["plan"] != "split_plan" or key not in measured:
            continue
        rows.append({"gpu": gpu, "batch": key[0], "q_len": key[1], "k_len": key[2], "estimate_us": row["estimate_us"],
                     "measured_us": round(measured[key], 2), "measured_over_estimate": round(measured[key] / row["estimate_us"], 2)})
    return rows


def table(rows: Sequence[dict]) -> str:
    """The rows as a markdown table; the estimate column labelled as one."""
    lines = ["| gpu | B | Lq | Lk | ESTIMATE us | measured us (cuda fwd median) | measured / ESTIMATE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['gpu']} | {r['batch']} | {r['q_len']} | {r['k_len']} | {r['estimate_us']} | {r['measured_us']} | "
                     f"{r['measured_over_estimate']} |")
    return "\n".join(lines)


def compare(estimate_path: Path, measured_paths: Sequence[Path]) -> Tuple[List[dict], str]:
    """(rows, note) for the estimate file and the measured results; the note says why no row exists."""
    estimate_rows = json.loads(estimate_path.read_text())["rows"]
    rows, devices = [], set()
    for path in measured_paths:
        result = json.loads(path.read_text())
        device = result.get("environment", {}).get("device", "")
        devices.add(device)
        gpu = gpu_of(device)
        if gpu is not None:
            rows += side_by_side(estimate_rows, measured_forward_us(result), gpu)
    note = "" if rows else f"no shape both estimated and measured on an H100/H200 (devices: {sorted(devices)})"
    return rows, note


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI: print the side-by-side table, optionally write its rows as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.estimate_vs_measured", description=__doc__.splitlines()[0])
    parser.add_argument("estimate", type=Path, help="the JSON of python -m bench.static --estimate --json PATH")
    parser.add_argument("measured", type=Path, nargs="+", help="benchmark result JSON files timed on the GPU")
    parser.add_argument("--json", type=Path, default=None, help="where to write the paired rows")
    args = parser.parse_args(argv)
    rows, note = compare(args.estimate, [path for path in args.measured if path.exists()])
    print(table(rows) if rows else note)
    if args.json is not None:
        args.json.write_text(json.dumps({"benchmark": "estimate_vs_measured", "rows": rows, "note": note}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
