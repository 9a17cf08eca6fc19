"""pytest-benchmark suites: ``pytest bench/ [--quick] --benchmark-json=out.json``.

Groups are named "<op> <pass> <shape>" so that every backend of one shape sits in one table and
``--benchmark-compare`` between two commits lines up test by test. ``--quick`` (or MPLUG_BENCH_QUICK=1)
shrinks every grid; on the CPU the grids are scaled down automatically.
"""
from __future__ import annotations

import os

import pytest
import torch

from bench.common import QUICK_ENV_VAR, default_device, synchronized


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="tiny benchmark grids (smoke run)")


def pytest_configure(config):
    if config.getoption("--quick"):
        os.environ[QUICK_ENV_VAR] = "1"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    """The device every suite runs on: cuda when present, else cpu."""
    return default_device()


@pytest.fixture
def run_benchmark(benchmark, bench_device):
    """run_benchmark(fn, group, rounds=None, **extra_info): time fn (synchronized) under pytest-benchmark.

    rounds=None lets pytest-benchmark calibrate; a number runs that many rounds after one warm-up (slow steps).
    """

    def run(fn, group: str, rounds=None, **extra_info):
        benchmark.group = group
        benchmark.extra_info.update(device=str(bench_device), **extra_info)
        timed = synchronized(fn, bench_device)
        if rounds is None:
            return benchmark(timed)
        return benchmark.pedantic(timed, rounds=rounds, warmup_rounds=1)

    return run
