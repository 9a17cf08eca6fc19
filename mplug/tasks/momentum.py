"""Momentum distillation (ALBEF, used by mPLUG): EMA copies of the encoders, projections, fusion, MLM head and decoder.

The copies are submodules of MPLUG named as the authors name them (``visual_encoder_m``, ``text_encoder_m``,
``fusion_encoder_m``, ``text_decoder_m``, ``vision_proj_m``, ``text_proj_m``; our ``mlm_head_m``), so their
checkpoint keys load as they are. ``add_momentum_copies`` makes them (copies of the online weights, no gradients),
``momentum_update`` moves them towards the online weights, ``MomentumView`` runs them through the task functions.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

MOMENTUM_MODULES = ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder", "vision_proj", "text_proj", "mlm_head")
SUFFIX = "_m"


def has_momentum_copies(model: nn.Module) -> bool:
    """Whether ``model`` holds its momentum copies."""
    return all(hasattr(model, name + SUFFIX) for name in MOMENTUM_MODULES)


def add_momentum_copies(model: nn.Module) -> nn.Module:
    """Give ``model`` momentum copies of MOMENTUM_MODULES (copied together so tied weights stay tied), with
    requires_grad False; a model that has them keeps them. Returns model."""
    if has_momentum_copies(model):
        return model
    copies = copy.deepcopy(nn.ModuleDict({name: getattr(model, name) for name in MOMENTUM_MODULES}))
    for name, module in copies.items():
        module.requires_grad_(False)
        model.add_module(name + SUFFIX, module)
    return model


def online_and_momentum_parameters(model: nn.Module):
    """(online, momentum) parameter pairs of the momentum copies, each tied parameter once."""
    online = nn.ModuleDict({name: getattr(model, name) for name in MOMENTUM_MODULES})
    momentum = nn.ModuleDict({name: getattr(model, name + SUFFIX) for name in MOMENTUM_MODULES})
    return zip(online.parameters(), momentum.parameters())


@torch.no_grad()
def momentum_update(model: nn.Module, momentum: float) -> None:
    """Every momentum parameter p_m <- momentum * p_m + (1 - momentum) * p (p the online parameter), in place."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for online, copy_ in online_and_momentum_parameters(model):
        copy_.mul_(momentum).add_(online.detach().to(copy_.dtype), alpha=1.0 - momentum)


def ramped_alpha(step: int, steps_per_epoch: int, epoch: int = 0, alpha: float = 0.4) -> float:
    """The distillation weight: alpha * min(1, step / steps_per_epoch) in epoch 0 (the ramp), alpha after."""
    if steps_per_epoch < 1 or step < 0 or epoch < 0:
        raise ValueError(f"need step >= 0, steps_per_epoch >= 1, epoch >= 0; got {step}, {steps_per_epoch}, {epoch}")
    return alpha if epoch > 0 else alpha * min(1.0, step / steps_per_epoch)


class MomentumView:
    """The momentum copies under the online names (``view.visual_encoder`` is ``model.visual_encoder_m``, ...), so
    the task functions run the momentum model; ``config`` and ``temp`` are the model's."""

    def __init__(self, model: nn.Module):
        if not has_momentum_copies(model):
            raise ValueError("the model has no momentum copies; call model.add_momentum_copies() first")
        self.config = model.config
        self.temp = model.temp
        for name in MOMENTUM_MODULES:
            setattr(self, name, getattr(model, name + SUFFIX))
