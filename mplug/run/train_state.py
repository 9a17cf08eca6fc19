"""Checkpoints of mplug.run.train: model, optimiser, scheduler, progress (epoch, step, position in the epoch), every
rank's RNG states and the run config, written atomically by rank 0 and read back for ``--resume``."""
from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from mplug.run.runtime import CHECKPOINT_FORMAT, all_gather_objects, atomic_write, barrier, is_main, is_training_checkpoint
from mplug.model.validation import load_checkpoint_file

LAST = "checkpoint_last.pth"
# Keys a resumed run may change: they log or save the run but do not change its steps (max_steps and epochs set the
# cosine schedule's length, so they may not change).
RESUMABLE_CHANGES = ("log_every", "save_every", "num_workers", "batch_size_test", "test_file",
                     "answer_list", "num_beams", "min_length", "max_length", "k_test")


@dataclass
class Progress:
    """Where training stands: epochs finished, optimiser steps taken, and steps taken in the current epoch."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0


def rng_state() -> dict:
    """This process's RNG states: torch CPU (and every CUDA device), python's random, numpy's global generator."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, gauss),
    }


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() returned."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_as_tuples(state["python"]))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


def _as_tuples(value):
    """random.setstate needs the nested tuples back (a reloaded checkpoint may hold lists)."""
    return tuple(_as_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value


def atomic_save(obj, path) -> None:
    """torch.save ``obj`` to ``path`` atomically (runtime.atomic_write): the old file or the whole new one, never a part."""
    atomic_write(path, lambda stream: torch.save(obj, stream))


def save_checkpoint(output: Path, model, optimizer, scheduler, progress: Progress, cfg: dict, steps=()) -> None:
    """Every rank gathers (full model and optimiser state, RNG states); rank 0 writes <output>/checkpoint_last.pth
    and checkpoint_step{N}.pth for N in ``steps``; all ranks wait for it."""
    model_state, optimizer_state = get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng_states = all_gather_objects([rng_state()])
    if is_main():
        state = {
            "format": CHECKPOINT_FORMAT, "model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), "progress": asdict(progress), "rng": rng_states, "config": cfg,
        }
        atomic_save(state, Path(output) / LAST)
        for step in steps:
            atomic_save(state, Path(output) / f"checkpoint_step{step}.pth")
    barrier()


def read_checkpoint(folder) -> dict:
    """<folder>/checkpoint_last.pth, checked to be an mplug.run.train checkpoint."""
    path = Path(folder) / LAST
    if not path.is_file():
        raise ValueError(f"--resume {os.fspath(folder)!r}: no {LAST} there (mplug.run.train writes it into its --output)")
    state = load_checkpoint_file(path, weights_only=True)
    if not is_training_checkpoint(state):
        raise ValueError(f"{path} is not a checkpoint written by mplug.run.train (no format {CHECKPOINT_FORMAT!r})")
    return state


def check_same_run(saved: dict, cfg: dict, path) -> None:
    """A resumed run must keep every config key that changes its steps (all but RESUMABLE_CHANGES)."""
    changed = sorted(key for key in set(saved) | set(cfg) if key not in RESUMABLE_CHANGES and saved.get(key) != cfg.get(key))
    if changed:
        details = "; ".join(f"{key}: checkpoint {saved.get(key)!r}, now {cfg.get(key)!r}" for key in changed)
        raise ValueError(f"--resume {os.fspath(path)!r}: the config differs from the checkpoint's in {details} "
                         f"(only {', '.join(RESUMABLE_CHANGES)} may change on resume)")


def check_same_world_size(state: dict, world_size: int, path) -> None:
    """A resumed run must have the checkpoint's number of processes (it sets each rank's data and the steps per epoch)."""
    saved = len(state["rng"])
    if saved != world_size:
        raise ValueError(f"--resume {os.fspath(path)!r}: the checkpoint was written by a run of {saved} process(es), this "
                         f"run has {world_size}; the data each process reads and the steps per epoch (so the schedule) "
                         f"depend on it: resume with {saved} process(es)")


def restore(state: dict, model, optimizer, scheduler) -> Progress:
    """Load a checkpoint's model, optimiser and scheduler into this run; returns its Progress (RNG: restore_rng)."""
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    scheduler.load_state_dict(state["scheduler"])
    return Progress(**state["progress"])


def restore_rng(state: dict) -> bool:
    """This rank's RNG states from the checkpoint; False (nothing restored) when it was written by another world size."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if len(state["rng"]) != world_size:
        return False
    set_rng_state(state["rng"][dist.get_rank() if dist.is_initialized() else 0])
    return True
