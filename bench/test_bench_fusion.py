"""pytest-benchmark suite of the fusion-variant grid (bench.fusion): variant x backend x Lv x pass."""
from __future__ import annotations

import pytest

from bench import fusion
from bench.common import bench_dtype, default_device, quick_mode

DEVICE = default_device()
DTYPE = bench_dtype(DEVICE)
QUICK = quick_mode()
CONFIG_NAME = "tiny" if QUICK else "base"
CONFIG = fusion.CONFIGS[CONFIG_NAME]()
BATCH = 64 if DEVICE.type == "cuda" else (2 if QUICK else 1)
VISION_LENS = (17,) if QUICK else (fusion.VISION_LENS if DEVICE.type == "cuda" else (257,))
BACKENDS, SKIPPED = fusion.fusion_backends(DEVICE, DTYPE, CONFIG)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", fusion.VARIANTS)
@pytest.mark.parametrize("vision_len", VISION_LENS, ids=lambda length: f"Lv{length}")
@pytest.mark.parametrize("pass_name", fusion.PASSES)
def test_fusion(run_benchmark, pass_name, vision_len, variant, backend):
    network = fusion.build_fusion(CONFIG, variant, backend, DEVICE, DTYPE)
    inputs = fusion.fusion_inputs(CONFIG, BATCH, vision_len, fusion.TEXT_LEN, DEVICE, DTYPE)
    run_benchmark(
        fusion.step_function(network, inputs, pass_name),
        f"fusion {CONFIG_NAME} {pass_name} Lv={vision_len} Lt={fusion.TEXT_LEN} B={BATCH}",
        variant=variant,
        backend=backend,
        batch=BATCH,
        gflops_per_sample=fusion.fusion_flops(CONFIG.replace(fusion=variant), vision_len, fusion.TEXT_LEN) / 1e9,
    )
