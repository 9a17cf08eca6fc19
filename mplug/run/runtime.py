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

from mplug.model.checkpoint import CLASSIFIER_HEADS, QUEUES, LoadResult, dtype_kind, load_official_checkpoint
from mplug.model.mplug import MPLUG
from mplug.run.run_config import TASKS
from mplug.model.validation import describe, load_checkpoint_file

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
        os.fchmod(handle, 0o666 & ~current_umask())  # mkstemp's 0600 would hide checkpoints and results from the group
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


def current_umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


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


def load_weights(model: MPLUG, path, task: Optional[str], partial: bool = False) -> LoadResult:
    """Load ``path`` into ``model``, checking everything before any tensor is written: a checkpoint of mplug.run.train
    (moves between tasks: momentum copies, queues and classifier heads the model lacks are dropped, those it has and
    the file lacks keep their initial values (momentum copies take the online weights) -> ignored_keys / missing_keys)
    or the authors' file (load_official_checkpoint; task "vqa"/"caption"/"retrieval"/"grounding"/"ve"/"nlvr" names
    a fine-tuned file's layout, None or "pretrain" the pretrained model's). Any other missing or unexpected key is
    refused unless ``partial``; non-finite weights, shape and dtype-kind changes are always refused."""
    if task is not None:
        check_task(task)
    state = load_checkpoint_file(path, weights_only=True)
    if not is_training_checkpoint(state):
        try:
            return load_official_checkpoint(model, state, strict=not partial, task=None if task == "pretrain" else task)
        except (RuntimeError, ValueError, TypeError) as error:
            hint = "" if partial else " (--partial-load accepts a file that fills only part of the model)"
            raise ValueError(f"checkpoint {os.fspath(path)!r} cannot be loaded: {error}{hint}") from None
    return _load_training_checkpoint(model, state, os.fspath(path), partial)


def _movable(key: str) -> bool:
    """Whether a key belongs to what differs between the tasks' models (momentum copies, queues, classifier heads)."""
    head = key.split(".")[0]
    return head.endswith("_m") or head in QUEUES or head in CLASSIFIER_HEADS.values()


def _load_training_checkpoint(model: MPLUG, state: dict, path: str, partial: bool) -> LoadResult:
    """load_weights of an mplug.run.train checkpoint."""
    weights, ours = state["model"], model.state_dict()
    source = f"checkpoint {path!r} (mplug.run.train, task {state['config'].get('task')!r}, model {state['config'].get('model')!r})"
    missing = [key for key in ours if key not in weights]
    unexpected = [key for key in weights if key not in ours]
    refused = [key for key in missing + unexpected if not _movable(key)]
    if refused and not partial:
        raise ValueError(
            f"{source} does not fit this model: missing keys {[k for k in missing if k in refused][:8]}, unexpected keys "
            f"{[k for k in unexpected if k in refused][:8]} (first 8 of each; {len(refused)} in all); --partial-load "
            f"loads the keys that fit and leaves the rest as initialised"
        )
    loadable = {key: value for key, value in weights.items() if key in ours}
    problems = [f"{key}: checkpoint {describe(value)}, model {describe(ours[key])}" for key, value in loadable.items()
                if not isinstance(value, torch.Tensor) or value.shape != ours[key].shape or dtype_kind(value) != dtype_kind(ours[key])]
    if problems:
        raise ValueError(f"{source}: tensors do not fit the model:\n  " + "\n  ".join(problems[:20]))
    non_finite = [key for key, value in loadable.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if non_finite:
        raise ValueError(f"{source} holds NaN or inf in {len(non_finite)} tensors, e.g. {non_finite[:8]}: refusing to load it")
    model.load_state_dict(loadable, strict=False)
    with torch.no_grad():
        for key in missing:
            head, _, rest = key.partition(".")
            if head.endswith("_m") and f"{head[:-2]}.{rest}" in loadable:
                ours[key].copy_(loadable[f"{head[:-2]}.{rest}"])
    return LoadResult(missing, [key for key in unexpected if key in refused], [key for key in unexpected if key not in refused])

