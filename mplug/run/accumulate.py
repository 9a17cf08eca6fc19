"""Gradient accumulation (config key ``accumulate_steps``), as the authors' caption_mplug.py:66-79 (--accum_steps,
default 4 at :337): each of n micro-batches' loss is divided by n and back-propagated, and the optimiser steps once
per n batches. One training "step" (progress.step, the scheduler, log and checkpoint counts) is one optimiser step,
so a checkpoint is only ever taken at an optimiser-step boundary. An epoch's last len(loader) % n batches (config key
``accumulate_last_group``): "carry" (the default) does as the authors, whose step test (i + 1) % accum_steps restarts
with each epoch's enumerate and who never zero the gradients at an epoch's start: those batches' gradient joins the
next epoch's first step (n + r micro-batches, each still divided by n) and the last epoch's is never used. We draw
them at the start of the next epoch instead of the end of theirs: the weights are the same (no step in between), no
checkpoint ever holds a pending gradient, and they take that step's extra inputs (momentum distillation's alpha).
"drop": they are never drawn. Under FSDP2, and DDP without static_graph, all but the last micro-batch run without
gradient reduction (no_sync); our DDP is built with static_graph=True, which refuses no_sync (reducer assert), so
there every micro-batch's gradient is averaged over the ranks as it is added: the same sum (each rank's accumulated
.grad holds the already-averaged earlier micro-batches, equal on every rank), more traffic."""
from __future__ import annotations

import contextlib
import itertools
from typing import Dict, Iterable, Iterator, List, Sequence, Tuple, Union

import torch

from mplug.run.runtime import autocast, to_device

Inputs = Union[dict, List[dict]]


def steps_per_epoch(num_batches: int, accumulate_steps: int) -> int:
    """Optimiser steps of an epoch of num_batches batches: whole groups of accumulate_steps."""
    return num_batches // accumulate_steps


def carried_batches(num_batches: int, accumulate_steps: int, last_group: str) -> int:
    """How many of an epoch's last batches join the next epoch's first step: len(loader) % n with "carry", else 0."""
    return num_batches % accumulate_steps if last_group == "carry" else 0


def group_batches(batches: Iterable[dict], accumulate_steps: int, groups: int,
                  carried: Sequence[dict] = ()) -> Iterator[dict]:
    """The first ``groups`` steps of ``batches``: each batch as it is (accumulate_steps 1) or merged by n: {"inputs":
    the micro-batch inputs (None when one of them has no usable item: the whole step is skipped), "dropped": every
    micro-batch's dropped items}; the ``carried`` batches (the previous epoch's last ones) open the first group. No
    batch after the last group is drawn."""
    if accumulate_steps == 1:
        yield from itertools.islice(batches, groups)
        return
    batches = iter(batches)
    group: List[dict] = list(carried)
    for _ in range(groups):
        group += itertools.islice(batches, accumulate_steps)
        inputs = [item["inputs"] for item in group]
        yield {"inputs": None if any(part is None for part in inputs) else inputs,
               "dropped": [drop for item in group for drop in item.get("dropped", [])]}
        group = []


def step_inputs(inputs: Inputs, extra: dict, device) -> Inputs:
    """A step's inputs (one batch's dict or a list of micro-batch dicts) on ``device`` with ``extra`` added to each."""
    if isinstance(inputs, list):
        return [{**to_device(part, device), **extra} for part in inputs]
    return {**to_device(inputs, device), **extra}


def _without_gradient_sync(module):
    """DDP's no_sync (not with static_graph, which refuses it), FSDP2's set_requires_gradient_sync(False) for the
    duration, or nothing (one process, static-graph DDP)."""
    if hasattr(module, "no_sync") and not getattr(module, "static_graph", False):
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def unsynced():
            module.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                module.set_requires_gradient_sync(True)
        return unsynced()
    return contextlib.nullcontext()


def accumulate_gradients(step_module, inputs: Inputs, optimizer, device,
                         accumulate_steps: int = 1) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """Zero the gradients, then forward and backward each micro-batch (a dict is one) with its loss divided by
    accumulate_steps -> (the mean loss, the mean of each named part over the micro-batches) detached; gradients
    reduced on the last backward only."""
    micro = inputs if isinstance(inputs, list) else [inputs]
    optimizer.zero_grad(set_to_none=True)
    total, parts_total = None, {}
    for index, part in enumerate(micro):
        last = index == len(micro) - 1
        with contextlib.nullcontext() if last else _without_gradient_sync(step_module):
            with autocast(device):
                out = step_module(**part)
            parts = out if isinstance(out, dict) else {}
            loss = sum(parts.values()) if parts else out
            (loss / accumulate_steps).backward()
        total = loss.detach() / len(micro) if total is None else total + loss.detach() / len(micro)
        for name, value in parts.items():
            parts_total[name] = parts_total.get(name, 0) + value.detach() / len(micro)
    return total, parts_total
