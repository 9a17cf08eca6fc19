"""Test session setup where no CUDA device exists: Triton runs under its CPU interpreter, and the
cuda backend runs the csrc/ kernels compiled for the CPU emulator (tests/cuda_emulator.py); the run ends
with the skip reasons grouped and counted."""
import os
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, settings

import cuda_emulator

# Property tests (tests/test_properties.py): "ci" is the default, derandomized (the same examples every run) and
# small; pytest --hypothesis-profile=long runs a deeper, random search.
settings.register_profile("ci", max_examples=10, derandomize=True, deadline=None, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=300, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile("ci")

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if cuda_emulator.host_compiler() is not None and not os.environ.get("MPLUG_KERNELS_CUDA_EMULATOR"):
        os.environ["MPLUG_KERNELS_CUDA_EMULATOR"] = str(cuda_emulator.build())


@pytest.fixture
def one_thread():
    """Torch on one thread for the test: the tiny model's many small matmuls thrash with two threads on a loaded
    2-core machine (use with pytestmark = pytest.mark.usefixtures("one_thread"))."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _skip_reason(report) -> str:
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return reason.removeprefix("Skipped: ")


def pytest_terminal_summary(terminalreporter):
    """After the run: every distinct skip reason once, with how many tests it skipped, most frequent first."""
    reasons = Counter(_skip_reason(report) for report in terminalreporter.stats.get("skipped", []))
    if reasons:
        terminalreporter.section(f"{sum(reasons.values())} skipped tests, grouped by reason")
        for reason, count in reasons.most_common():
            terminalreporter.write_line(f"{count:5d}  {reason}")
