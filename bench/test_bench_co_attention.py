"""pytest-benchmark suite of the co_attention kernel grid (bench.bench_co_attention), every available backend."""
from __future__ import annotations

import pytest

from bench.bench_co_attention import GRIDS, PASSES, available_runners, grid_shapes, pass_functions
from bench.common import bench_dtype, default_device

DEVICE = default_device()
DTYPE = bench_dtype(DEVICE)
RUNNERS, SKIPPED = available_runners(DEVICE, DTYPE)
SHAPES = grid_shapes(GRIDS.select(DEVICE))


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda runner: runner.name)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda shape: f"B{shape.batch}-Lq{shape.q_len}-Lk{shape.k_len}")
@pytest.mark.parametrize("pass_name", PASSES)
def test_co_attention(run_benchmark, pass_name, shape, runner):
    functions = pass_functions(runner, shape, DTYPE, DEVICE)
    with runner.context():
        run_benchmark(
            functions[pass_name],
            f"co_attention {pass_name} {shape.label()}",
            backend=runner.name,
            dtype=str(DTYPE),
            flops=shape.flops(pass_name),
            bytes=shape.bytes_moved(pass_name, DTYPE.itemsize),
        )
