"""pytest-benchmark suites: ``pytest bench/ [--quick] --benchmark-json=out.json``.

Groups are named "<op> <pass> <shape>" so that every backend of one shape sits in one table and
``--benchmark-compare`` between two commits lines up test by test. ``--quick`` (or MPLUG_BENCH_QUICK=1)
shrinks every grid; on the CPU the grids are scaled down automatically.
"""
from __future__ import annotations

import math
import os
import time

import pytest
import torch

from bench.common import (
    NOISY_SPREAD,
    QUICK_ENV_VAR,
    TimingPolicy,
    calls_per_sample,
    default_device,
    flush_l2,
    profile_call,
    quick_mode,
    synchronized,
)


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny benchmark grids (smoke run)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ[QUICK_ENV_VAR] = "1"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device every suite runs on: cuda when present, else cpu."""
    return default_device()


def planned_rounds(policy: TimingPolicy, first_call_s: float) -> int:
    """Rounds for pytest-benchmark under policy: enough to spend the cell budget, within [min_repeats, max_repeats]."""
    wanted = math.ceil(policy.budget_s / max(first_call_s, 1e-9))
    return max(policy.min_repeats, min(policy.max_repeats, wanted))


@pytest.fixture
def run_benchmark(benchmark, bench_device):
    """run_benchmark(fn, group, **extra_info): time fn under pytest-benchmark with bench.common's timing policy.

    One profiled warm-up call (peak memory and attention backends go to extra_info), policy.warmup - 1 more
    warm-up rounds, then rounds enough for the cell budget within the policy's repeat bounds, each of
    calls_per_sample calls; on a GPU the L2 cache is flushed before every round (untimed) and fn is synchronized. extra_info also gets ``noisy``
    (spread > 20% of the median). Comparisons between backends come from --benchmark-compare across runs.
    """

    def run(fn, group: str, **extra_info):
        policy = TimingPolicy.for_device(bench_device, None if not quick_mode() else 0.0)
        timed = synchronized(fn, bench_device)
        start = time.perf_counter()
        peak_memory_mb, attention_backends = profile_call(timed, bench_device)
        first_call_s = time.perf_counter() - start
        rounds = planned_rounds(policy, first_call_s)
        iterations = calls_per_sample(timed, bench_device, first_call_s)
        setup = flush_l2(bench_device) if bench_device.type == "cuda" else None
        benchmark.group = group
        benchmark.extra_info.update(device=str(bench_device), peak_memory_mb=peak_memory_mb,
                                    attention_backends=attention_backends, timing_policy=policy.describe(), **extra_info)
        result = benchmark.pedantic(timed, setup=setup, rounds=rounds, iterations=iterations, warmup_rounds=policy.warmup - 1)
        if benchmark.stats is not None:  # None under --benchmark-disable
            stats = benchmark.stats.stats
            benchmark.extra_info["noisy"] = (stats.max - stats.min) / stats.median > NOISY_SPREAD
        return result

    return run
