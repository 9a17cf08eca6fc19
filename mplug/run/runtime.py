"""What mplug.run.train and mplug.run.evaluate share: the process group from torchrun, the model of a run config, loading
its weights (our training checkpoints or the authors' files), bf16 autocast on CUDA and a few collectives."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional

import torch
import torch.distributed as dist

from mplug.model.checkpoint import CLASSIFIER_HEADS, LoadResult, load_official_checkpoint
from mplug.model.mplug import MPLUG
from mplug.run.run_config import TASKS
from mplug.model.validation import load_checkpoint_file

CHECKPOINT_FORMAT = "mplug.run.train/1"
MOMENTUM_TASKS = ("retrieval", "pretrain")


class DistInfo(NamedTuple):
    """This process's place in the job: rank, world size, local rank (GPU index on its node) and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK; nccl on CUDA, gloo on the CPU); a
    plain ``python -m`` run is world 1 without a process group."""
    cuda = torch.cuda.is_available()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(0, 1, 0, torch.device("cuda", 0) if cuda else torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local_rank)
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def close_distributed(wait: bool = True) -> None:
    """Leave the process group (all ranks meet first unless ``wait`` is False, e.g. after an error); nothing without one."""
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def is_main() -> bool:
    """Whether this process is rank 0 (or the only one)."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank; nothing without a process group."""
    if dist.is_initialized():
        dist.barrier()


def all_gather_objects(items: list) -> List:
    """Every rank's ``items`` (picklable) concatenated in rank order, on every rank; a copy of ``items`` in one process."""
    if not dist.is_initialized():
        return list(items)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(items))
    return [item for part in gathered for item in part]


def autocast(device: torch.device):
    """bf16 autocast on CUDA, a no-op context elsewhere (the CPU trains in fp32)."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def to_device(inputs: dict, device) -> dict:
    """A batch's ``inputs`` with every tensor moved to ``device`` (other values as they are)."""
    return {name: value.to(device, non_blocking=True) if torch.is_tensor(value) else value for name, value in inputs.items()}


def atomic_write(path, write: Callable, binary: bool = True) -> None:
    """Call ``write(file)`` on a temporary file in path's folder, fsync it, then os.replace it onto ``path``: path
    holds either its old content or the whole new one, never a part (the temporary file is removed on errors)."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb" if binary else "w") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def check_task(task) -> None:
    """task must be one of TASKS."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def build_model(cfg: dict, device, task: str) -> MPLUG:
    """The MPLUG of run config ``cfg`` (model tiny/base/large at cfg image_size) for ``task``, on ``device``;
    retrieval and pretraining get the momentum copies their losses distil from, ve and nlvr the classifier heads."""
    from mplug.run.run_config import build_model_config

    check_task(task)
    model = MPLUG(build_model_config(cfg))
    if task in MOMENTUM_TASKS:
        model.add_momentum_copies()
    if task in CLASSIFIER_HEADS:
        model.add_classifier_heads()
    return model.to(device)


def is_training_checkpoint(state) -> bool:
    """Whether a loaded file is a checkpoint written by mplug.run.train."""
    return isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT


def load_weights(model: MPLUG, path, task: Optional[str]) -> LoadResult:
    """Load ``path`` into ``model``: a checkpoint of mplug.run.train (every key must fit) or the authors' file
    (load_official_checkpoint; task "vqa"/"caption"/"retrieval"/"grounding"/"ve"/"nlvr" names a fine-tuned file's layout, None or
    "pretrain" the pretrained model's)."""
    if task is not None:
        check_task(task)
    state = load_checkpoint_file(path, weights_only=True)
    if not is_training_checkpoint(state):
        return load_official_checkpoint(model, state, task=None if task == "pretrain" else task)
    result = model.load_state_dict(state["model"], strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} (mplug.run.train, task {state['config'].get('task')!r}, model "
            f"{state['config'].get('model')!r}) does not fit this model: missing keys {result.missing_keys[:8]}, "
            f"unexpected keys {result.unexpected_keys[:8]} (first 8 of each)"
        )
    return LoadResult([], [], [])
