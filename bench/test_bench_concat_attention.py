"""pytest-benchmark suite of the concat_attention kernel grid (bench.bench_concat_attention), every available runner."""
from __future__ import annotations

import pytest

from bench import bench_concat_attention as concat
from bench.bench_co_attention import PASSES
from bench.common import bench_dtype, default_device

DEVICE = default_device()
DTYPE = bench_dtype(DEVICE)
RUNNERS, SKIPPED = concat.available_runners(DEVICE, DTYPE)
GRID = concat.GRIDS.select(DEVICE)
SHAPES = concat.grid_shapes(GRID)


def shape_id(shape) -> str:
    return f"{shape.use}-B{shape.batch}-q{'+'.join(map(str, shape.q_lens))}-k{'+'.join(map(str, shape.k_lens))}"


@pytest.mark.parametrize("runner", RUNNERS, ids=lambda runner: runner.name)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("pass_name", PASSES)
def test_concat_attention(run_benchmark, pass_name, shape, runner):
    functions = concat.pass_functions(runner, shape, DTYPE, DEVICE)
    total = shape.total()
    with runner.context():
        run_benchmark(
            functions[pass_name],
            f"concat_attention {pass_name} {shape_id(shape)}",
            backend=runner.name,
            dtype=str(DTYPE),
            flops=total.flops(pass_name),
            bytes=total.bytes_moved(pass_name, DTYPE.itemsize),
        )
