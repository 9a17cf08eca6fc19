"""Non-finite losses, gradients and weights in mplug.run.train: a step whose loss or gradient norm is NaN/inf on any
rank is skipped (no optimiser update), more than skip_non_finite_steps of them in a row stop the run, and weights
holding NaN/inf are never saved."""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


class DivergedError(RuntimeError):
    """The run stopped on non-finite losses, gradients or weights (the last good checkpoint is kept)."""


def clip_and_check(loss: torch.Tensor, parameters: Iterable[torch.Tensor], max_grad_norm: float) -> bool:
    """Clip the gradients to max_grad_norm (> 0; 0 = no clipping) -> whether the loss and the gradient norm are finite
    on every rank (the same answer on all of them)."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm if max_grad_norm > 0 else math.inf)
    if hasattr(norm, "full_tensor"):  # FSDP2 gives a DTensor
        norm = norm.full_tensor()
    finite = (torch.isfinite(loss.detach().float()).all() & torch.isfinite(norm.float())).float()
    if dist.is_initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def check_skipped(skipped: int, limit: int, step: int, loss: float) -> None:
    """Raise DivergedError when ``skipped`` (non-finite steps in a row) exceeds ``limit`` (skip_non_finite_steps)."""
    if skipped > limit:
        raise DivergedError(
            f"step {step}: the loss ({loss}) or the gradient is not finite, {skipped} step(s) in a row (config key "
            f"skip_non_finite_steps = {limit}); the run stopped without saving these weights: lower optimizer.lr, "
            f"set max_grad_norm, or resume from the last checkpoint"
        )


def check_finite_weights(model: nn.Module, step: int) -> None:
    """Raise DivergedError naming the parameters and buffers that hold NaN or inf (call before saving)."""
    bad = [name for name, value in list(model.named_parameters()) + list(model.named_buffers())
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if bad:
        raise DivergedError(f"step {step}: {len(bad)} weights hold NaN or inf, e.g. {bad[:5]}; not saved (the last "
                            f"checkpoint keeps the last finite weights)")
