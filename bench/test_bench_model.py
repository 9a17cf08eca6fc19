"""pytest-benchmark suite of the full-model rows (bench.model_bench): training step and VQA generation."""
from __future__ import annotations

import pytest

from bench import model_bench
from bench.common import bench_dtype, default_device, quick_mode
from bench.fusion import CONFIGS

DEVICE = default_device()
DTYPE = bench_dtype(DEVICE)
CONFIG_NAME = "tiny" if quick_mode() else "base"
BATCH = 32 if DEVICE.type == "cuda" else 2


@pytest.fixture(scope="module")
def model_and_inputs():
    config = CONFIGS[CONFIG_NAME](dropout=0.0)
    return model_bench.build_model(config, DEVICE, DTYPE), model_bench.make_batch(config, BATCH, DEVICE, DTYPE)


@pytest.mark.parametrize("setup", model_bench.SETUPS)
@pytest.mark.parametrize("task", model_bench.TASKS)
def test_model(run_benchmark, model_and_inputs, task, setup):
    model, inputs = model_and_inputs
    function = model_bench.task_function(model, inputs, setup, task)
    run_benchmark(function, f"model {CONFIG_NAME} {task} B={BATCH}", setup=setup, batch=BATCH)
