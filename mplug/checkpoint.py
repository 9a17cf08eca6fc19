"""load_official_checkpoint: the authors' released .pth files (pretrained or fine-tuned) into our MPLUG."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mplug.validation import check_own_layout, check_state_dict_keys, load_checkpoint_file, non_finite_entries


POSITIONAL_EMBEDDING = "visual_encoder.visual.positional_embedding"
QUEUES = ("image_queue", "text_queue", "queue_ptr", "idx_queue")
PREFIX_RENAMES = (
    ("visn_fc.", "visual_encoder.visn_fc."),
    ("visn_layer_norm.", "visual_encoder.visn_layer_norm."),
    ("text_encoder.bert.", "text_encoder."),
    ("text_encoder.cls.predictions.", "mlm_head."),
    ("fusion_encoder.cls.predictions.", "mlm_head."),
    ("fusion_encoder.fusion.", "fusion_encoder."),
    ("fusion_encoder.bert.", "fusion_encoder."),
)
FUSION_LAYER = re.compile(r"^fusion_encoder\.encoder\.layer\.(\d+)\.(.*)$")
UNUSED_PREFIXES = (
    "visual_encoder.transformer.",  # CLIP's text tower, kept in the authors' files, unused by mPLUG
    "visual_encoder.token_embedding.",
    "visual_encoder.positional_embedding",
    "visual_encoder.ln_final.",
    "visual_encoder.text_projection",
    "visual_encoder.logit_scale",
    "visual_encoder.visual.proj",  # CLIP's image projection: mPLUG takes all ViT tokens unprojected
    "fusion_encoder.embeddings.",  # the fusion BERT's own embeddings: the fusion reads the text encoder's output
    "mlm_head.decoder.",  # our MLM head's decoder is tied to text_encoder's word embeddings and to mlm_head.bias
)
TASK_MODULES = {
    "vqa": ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder"),
    "caption": ("visual_encoder", "text_decoder"),
    "retrieval": ("visual_encoder", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "itm_head", "temp"),
}


class LoadResult(NamedTuple):
    """Model keys the checkpoint did not fill, checkpoint keys the model has no place for, and keys
    skipped on purpose (momentum copies, queues, fusion layers that never run, unused weights)."""

    missing_keys: List[str]
    unexpected_keys: List[str]
    ignored_keys: List[str]


def _read(path_or_state_dict, weights_only: bool) -> Dict[str, torch.Tensor]:
    """The flat state dict inside a path, a {'model'|'module': ...} dict or a state dict."""
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        path_or_state_dict = load_checkpoint_file(path_or_state_dict, weights_only)
    if not isinstance(path_or_state_dict, dict):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(path_or_state_dict).__name__}")
    for wrapper in ("model", "module"):
        if isinstance(path_or_state_dict.get(wrapper), dict):
            path_or_state_dict = path_or_state_dict[wrapper]
            break
    check_state_dict_keys(path_or_state_dict)
    return path_or_state_dict


def _renamed(key: str, config) -> Tuple[Optional[str], bool]:
    """(our name for an official key or None for a fusion layer that never runs or a weight mPLUG does not use,
    whether the model may lack it); a momentum key (``name_m.*``) maps like ``name.*`` and keeps its ``_m``."""
    head, _, rest = key.partition(".")
    if head.endswith("_m"):
        key, _ = _renamed(f"{head[:-2]}.{rest}", config)
        if key is None:
            return None, True
        head, _, rest = key.partition(".")
        return f"{head}_m.{rest}", True
    for old, new in PREFIX_RENAMES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith(UNUSED_PREFIXES):
        return None, True
    match = FUSION_LAYER.match(key)
    if match:
        k = int(match.group(1)) - config.text_layers
        if k < 0:
            return None, True
        key = f"fusion_encoder.encoder.layer.{k}.{match.group(2)}"
        return key, config.is_connected_layer(k) and match.group(2).startswith("crossattention.")
    return key, key.endswith("predictions.decoder.bias")


def _always_ignored(key: str) -> bool:
    return key.split(".")[0] in QUEUES or key.endswith("embeddings.position_ids")


def resize_positional_embedding(positions: torch.Tensor, length: int) -> torch.Tensor:
    """[1 + n*n, w] -> [length, w]: the class row kept, the n x n grid resized bilinearly to sqrt(length - 1) squared."""
    old_side, new_side = math.isqrt(positions.shape[0] - 1), math.isqrt(length - 1)
    if min(old_side, new_side) < 1 or old_side ** 2 != positions.shape[0] - 1 or new_side ** 2 != length - 1:
        raise ValueError(
            f"{POSITIONAL_EMBEDDING}: cannot resize {tuple(positions.shape)} to {length} rows; both grids must be "
            f"square with at least one cell (1 + n * n rows, n >= 1)"
        )
    grid = positions[1:].float().reshape(1, old_side, old_side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new_side, new_side), mode="bilinear", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_side * new_side, -1).to(positions.dtype)
    return torch.cat([positions[:1], grid], dim=0)


def _shared_with_loaded(key: str, loaded: set, params: Dict[str, torch.Tensor]) -> bool:
    """Whether ``key`` is a tied alias (same storage) of a key that was loaded."""
    pointer = params[key].data_ptr()
    return any(params[other].data_ptr() == pointer for other in loaded)


def load_official_checkpoint(
    model: nn.Module, path_or_state_dict, strict: bool = False, weights_only: bool = True, task: Optional[str] = None
) -> LoadResult:
    """Load the authors' checkpoint (path, {'model'|'module': state dict} or state dict) into ``model``.

    Strips the pretrained prefixes, maps fusion layer 6 + k (text_layers + k) to our layer k, takes the MLM head
    from ``text_encoder.cls`` or ``fusion_encoder.cls``, ignores the queues and the weights mPLUG does not use
    (CLIP's text tower and image projection, the fusion BERT's embeddings), resizes the visual position grid to
    the configured image size, and raises ValueError naming every key whose shape does not fit. Momentum keys
    (``*_m.*``) load into the momentum copies when the model has them (else ignored); momentum weights the file
    lacks are copied from the loaded online weights. task ("vqa", "caption", "retrieval" or None = the whole
    pretrained model) names the file's layout: model parts it does not hold are left alone and not reported
    missing. Returns LoadResult; with strict=True a missing or unexpected key raises RuntimeError. weights_only is
    torch.load's flag (old .pth files holding an argparse Namespace need weights_only=False: only for trusted files).
    """
    if task is not None and task not in TASK_MODULES:
        raise ValueError(f"task must be None or one of {sorted(TASK_MODULES)}, got {task!r}")
    config = model.config
    ours = model.state_dict(keep_vars=True)
    loadable: Dict[str, torch.Tensor] = {}
    unexpected, ignored, mismatched = [], [], []
    state = {key[len("module."):] if key.startswith("module.") else key: value
             for key, value in _read(path_or_state_dict, weights_only).items()}
    check_own_layout(state, config.text_layers)
    for official_key, value in state.items():
        if _always_ignored(official_key):
            ignored.append(official_key)
            continue
        key, may_be_absent = _renamed(official_key, config)
        if key is None or key not in ours:
            (ignored if may_be_absent else unexpected).append(official_key)
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint key {official_key!r} holds a {type(value).__name__}, not a tensor")
        if key.replace("visual_encoder_m.", "visual_encoder.", 1) == POSITIONAL_EMBEDDING and value.dim() == 2 and value.shape[1] == ours[key].shape[1]:
            value = resize_positional_embedding(value, ours[key].shape[0]) if value.shape != ours[key].shape else value
        if value.shape != ours[key].shape:
            mismatched.append(f"{official_key} -> {key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}")
            continue
        loadable[key] = value
    if mismatched:
        raise ValueError("checkpoint shapes do not fit the model:\n  " + "\n  ".join(mismatched))
    loaded = set(loadable)
    momentum_loaded = any(key.split(".")[0].endswith("_m") for key in loaded)
    missing = [
        key for key in ours
        if key not in loaded and key not in QUEUES and not _shared_with_loaded(key, loaded, ours)
        and _expected(key, task, momentum_loaded)
    ]
    if strict and (missing or unexpected):
        raise RuntimeError(f"strict load failed (nothing was loaded): missing keys {missing}, unexpected keys {unexpected}")
    non_finite_entries(loadable, strict)
    model.load_state_dict(loadable, strict=False)
    _copy_online_into_unloaded_momentum(ours, loaded)
    return LoadResult(missing, unexpected, ignored)


@torch.no_grad()
def _copy_online_into_unloaded_momentum(ours: Dict[str, torch.Tensor], loaded: set) -> None:
    """Every momentum tensor (``name_m.*``) the file did not fill (nor a tied alias of it) takes its online value."""
    for key, value in ours.items():
        head, _, rest = key.partition(".")
        if head.endswith("_m") and key not in loaded and not _shared_with_loaded(key, loaded, ours):
            value.copy_(ours[f"{head[:-2]}.{rest}"])


def _expected(key: str, task: Optional[str], momentum_loaded: bool) -> bool:
    """Whether the file of ``task``'s layout should hold our ``key`` (momentum keys only when it holds any)."""
    head = key.split(".")[0]
    if head.endswith("_m"):
        if not momentum_loaded:
            return False
        head = head[:-2]
    return task is None or head in TASK_MODULES[task]
