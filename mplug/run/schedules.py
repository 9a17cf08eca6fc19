"""The authors' learning-rate schedule (AliceMind mPLUG/scheduler/cosine_lr.py as vqa_mplug.py / caption_mplug.py
step it), as a LambdaLR factor per parameter group: ``schedule.kind: authors``."""
from __future__ import annotations

import math

import torch

from mplug.run.authors_options import AUTHORS_STEP_SIZE


def authors_lr(step: int, steps_per_epoch: int, epochs: int, warmup_steps: int, base_lr: float, warmup_lr: float,
               min_lr: float) -> float:
    """The learning rate of optimiser step ``step`` (0-based) in the authors' run: in epoch 0 their scheduler is
    stepped after iteration i when i % 100 == 0 and i <= warmup_steps, to t = i // 100 (warmup_lr + t (base - warmup_lr)
    / W for t < W = warmup_steps / 100, base at t = W), and held in between; from epoch e >= 1 on, once per epoch,
    min_lr + (base - min_lr) (1 + cos(pi e / epochs)) / 2 (cosine_lr.py _get_lr, warmup_prefix, t_initial = epochs)."""
    epoch, i = divmod(step, steps_per_epoch)
    periods = warmup_steps // AUTHORS_STEP_SIZE
    if epoch == 0:
        t = min((max(i, 1) - 1) // AUTHORS_STEP_SIZE, periods)
        if t < periods:
            return warmup_lr + t * (base_lr - warmup_lr) / periods
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * epoch / epochs))


def build_authors_schedule(optimizer, schedule_cfg: dict, epochs: int, steps_per_epoch: int):
    """LambdaLR over the optimiser's groups following authors_lr (each group's own lr as base_lr)."""
    def factor(base_lr: float):
        if base_lr <= 0:
            return lambda step: 0.0
        return lambda step: authors_lr(step, steps_per_epoch, epochs, schedule_cfg["warmup_steps"], base_lr,
                                       schedule_cfg["warmup_lr"], schedule_cfg["min_lr"]) / base_lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(group["lr"]) for group in optimizer.param_groups])
