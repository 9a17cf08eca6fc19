"""Smoke tests of bench.bench_owl3 on its quick grid: every case runs and every row is labelled; the peers compute
the same attention as our reference backend (so they are timed on the same problem). No timing is asserted."""
from __future__ import annotations

import json

import pytest
import torch

from bench import bench_owl3 as owl3
from bench.common import Run, TimingPolicy, bench_dtype, default_device, write_results

DEVICE = default_device()
DTYPE = bench_dtype(DEVICE)
CASES = owl3.grid_cases(owl3.GRIDS.quick)
# float32 throughout; a GPU kernel may multiply in TF32 (10-bit mantissa)
TOLERANCE = {"atol": 2e-5, "rtol": 1e-4} if DEVICE.type == "cpu" else {"atol": 5e-3, "rtol": 5e-3}


def test_quick_grid_runs_and_labels_every_row(tmp_path):
    policy = TimingPolicy.for_device(DEVICE, 0.0)
    rows, ratios, extra = owl3.run(DEVICE, owl3.GRIDS.quick, policy, compile_flex=False)
    assert {row["use"] for row in rows} == {"decode", "owl3 images", "owl3 video"}
    assert all(row["label"] for row in rows)
    timed = {(row["use"], row["backend"], row["pass"]) for row in rows if "ms_median" in row}
    for use in ("decode", "owl3 images"):
        assert {(use, "flex", "fwd"), (use, "sdpa", "fwd")} <= timed
    assert ("owl3 images", "sdpa", "bwd") in timed
    path = write_results("owl3", Run(DEVICE, policy), rows, tmp_path, ratios, **extra)
    assert len(json.loads(path.read_text())["rows"]) == len(rows)


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.use)
def test_every_runner_matches_the_reference(case):
    q, ks, vs = owl3.make_tensors(case, torch.float32, DEVICE)
    masks, key_positions, query_positions = owl3.visibility_args(case, DEVICE)
    want = owl3.concat_attention(q, ks, vs, masks, key_positions=key_positions, query_positions=query_positions,
                                 backend="reference")
    runners, _ = owl3.case_runners(case, ks, compile_flex=False)
    for runner in runners:
        with runner.context(), torch.no_grad():
            try:
                got = runner.attend(q, ks, vs)
            except RuntimeError:  # e.g. an SDPA kernel that takes no float32 or no mask on a GPU
                continue
        torch.testing.assert_close(got, want, **TOLERANCE, msg=lambda text: f"{runner.name}: {text}")
