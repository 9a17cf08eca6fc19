"""The two-process gloo launches of mplug.run.train (the DDP/FSDP2 tests of tests/test_train.py and
tests/test_accumulate.py) and mplug.run.evaluate (tests/test_evaluate.py, tests/test_evaluate_video.py), and the
subprocess environment of the tests that start python processes."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from mplug.run.train_state import LAST

REPO = Path(__file__).resolve().parents[1]


def subprocess_env():
    """The same thread count as this process, so the CPU reductions (and so the weights) are bit-identical."""
    threads = str(torch.get_num_threads())
    path = os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "PYTHONPATH": path}


def run_two_processes(module: str, output: Path, *arguments: str) -> None:
    """torchrun --standalone, 2 CPU processes (gloo, one thread each) of python -m ``module`` ``arguments`` --output
    ``output`` (run in its parent folder); a failed run fails the test."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               module, *arguments, "--output", str(output)]
    finished = subprocess.run(command, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, cwd=Path(output).parent,
                              capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]


def train_two_processes(output: Path, *arguments: str) -> dict:
    """run_two_processes of mplug.run.train -> its last checkpoint (loaded)."""
    run_two_processes("mplug.run.train", output, *arguments)
    return torch.load(Path(output) / LAST, weights_only=True)


def evaluate_two_processes(task: str, config: Path, checkpoint: Path, output: Path, *arguments: str) -> None:
    """run_two_processes of python -m mplug.run.evaluate --task task --config config --checkpoint checkpoint."""
    run_two_processes("mplug.run.evaluate", output, "--task", task, "--config", str(config), "--checkpoint",
                      str(checkpoint), *arguments)
