"""load_official_checkpoint: the authors' released .pth files (pretrained or fine-tuned) into our MPLUG."""
from __future__ import annotations

import math
import os
import re
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mplug.tasks.classification import add_classifier_heads
from mplug.tasks.grounding import grounding_tokens
from mplug.model.validation import check_own_layout, check_state_dict_keys, describe, load_checkpoint_file, non_finite_entries


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
# Our modules each fine-tuned layout holds (momentum copies aside). Where the key names come from:
# - "grounding": the authors' mPLUG/models/model_grounding_mplug.py (AliceMind; saved by grounding_mplug.py as
#   {'model': state_dict()}): visual_encoder (CLIP), visn_fc/visn_layer_norm, text_encoder (BertModel, no "bert."),
#   fusion_encoder (FusionModel, layers 6..11 run), vision_proj and text_proj (built, unused by grounding),
#   text_decoder (BertPrefixModelForGrounding = BertPrefixModel: bert.* and cls.predictions.* over BERT's own
#   30522-token vocabulary, no rows added), no momentum copies, and three buffers: prefix_ids ([unused339], id 344),
#   target_ids ([unused340] .. [unused676], ids 345..681: image_res 336 + 1 levels) and bbox_prob_mask.
# - "ve", "nlvr": the authors released no SNLI-VE or NLVR2 model, script or weights (their repository holds only
#   dataset/ve_dataset.py and dataset/nlvr_dataset.py). ASSUMED layout: the encoders named as in their other
#   fine-tuned files, and the classifier named as in ALBEF, the code base mPLUG's is built on (ALBEF
#   models/model_ve.py, models/model_nlvr.py: cls_head = Sequential(Linear, ReLU, Linear), momentum copy cls_head_m).
#   Our nlvr_head reads the two fused [CLS] states side by side (2 x hidden); ALBEF's NLVR head reads one [CLS] of a
#   text encoder whose doubled cross-attention layers alternate between the two images (share_cross_attention):
#   such a file's head is refused by shape and its extra fusion layers are reported unexpected.
TASK_MODULES = {
    "vqa": ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder"),
    "caption": ("visual_encoder", "text_decoder"),
    "retrieval": ("visual_encoder", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "itm_head", "temp"),
    "grounding": ("visual_encoder", "text_encoder", "fusion_encoder", "vision_proj", "text_proj", "text_decoder"),
    "ve": ("visual_encoder", "text_encoder", "fusion_encoder", "ve_head"),
    "nlvr": ("visual_encoder", "text_encoder", "fusion_encoder", "nlvr_head"),
}
CLASSIFIER_HEADS = {"ve": "ve_head", "nlvr": "nlvr_head"}  # added by mplug.tasks.classification; no pretrained file holds them
TASK_RENAMES = {task: (("cls_head.", f"{head}."),) for task, head in CLASSIFIER_HEADS.items()}
GROUNDING_BUFFERS = ("prefix_ids", "target_ids", "bbox_prob_mask")
DECODER_VOCABULARY = (  # our decoder tensors with one row per token id
    "text_decoder.bert.embeddings.word_embeddings.weight",
    "text_decoder.cls.predictions.decoder.weight",
    "text_decoder.cls.predictions.bias",
)


class LoadResult(NamedTuple):
    """Model keys the checkpoint did not fill, checkpoint keys the model has no place for, and keys
    skipped on purpose (momentum copies, queues, fusion layers that never run, unused weights, grounding's
    token-id buffers)."""

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


def _renamed(key: str, config, renames=PREFIX_RENAMES) -> Tuple[Optional[str], bool]:
    """(our name for an official key or None for a fusion layer that never runs or a weight mPLUG does not use,
    whether the model may lack it); a momentum key (``name_m.*``) maps like ``name.*`` and keeps its ``_m``."""
    head, _, rest = key.partition(".")
    if head.endswith("_m"):
        key, _ = _renamed(f"{head[:-2]}.{rest}", config, renames)
        if key is None:
            return None, True
        head, _, rest = key.partition(".")
        return f"{head}_m.{rest}", True
    for old, new in renames:
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


def _always_ignored(key: str, task: Optional[str]) -> bool:
    return key.split(".")[0] in QUEUES or key.endswith("embeddings.position_ids") or (task == "grounding" and key in GROUNDING_BUFFERS)


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
    lacks are copied from the loaded online weights. task ("vqa", "caption", "retrieval", "grounding", "ve",
    "nlvr" or None = the whole pretrained model) names the file's layout: model parts it does not hold are left
    alone and not reported missing. "ve" / "nlvr" load ``cls_head.*`` into ve_head / nlvr_head (added when
    missing); "grounding" copies the decoder rows of the file's prefix_ids / target_ids tokens to our grounding
    token ids (mplug.tasks.grounding). Returns LoadResult; with strict=True a missing or unexpected key raises
    RuntimeError. weights_only is torch.load's flag (old .pth files holding an argparse Namespace need
    weights_only=False: only for trusted files). On any error the model is left as it was.
    """
    if task is not None and task not in TASK_MODULES:
        raise ValueError(f"task must be None or one of {sorted(TASK_MODULES)}, got {task!r}")
    state = {key[len("module."):] if key.startswith("module.") else key: value
             for key, value in _read(path_or_state_dict, weights_only).items()}
    check_own_layout(state, model.config.text_layers)
    added = [head for head in CLASSIFIER_HEADS.values() if task in CLASSIFIER_HEADS and not hasattr(model, head)]
    if added:
        add_classifier_heads(model)
    try:
        return _load(model, state, strict, task)
    except Exception:
        for head in added:
            delattr(model, head)
        raise


def _load(model: nn.Module, state: Dict[str, torch.Tensor], strict: bool, task: Optional[str]) -> LoadResult:
    """load_official_checkpoint on a flat state dict without the ``module.`` prefix."""
    ours = model.state_dict(keep_vars=True)
    loadable, unexpected, ignored = _sorted_keys(state, ours, model.config, task)
    if task == "grounding":
        _move_grounding_rows(loadable, *_grounding_rows(state, model.config))
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


def _sorted_keys(state, ours, config, task) -> Tuple[Dict[str, torch.Tensor], List[str], List[str]]:
    """({our key: value} to load, unexpected official keys, ignored official keys); ValueError naming every key
    whose shape does not fit."""
    renames = PREFIX_RENAMES + TASK_RENAMES.get(task, ())
    loadable: Dict[str, torch.Tensor] = {}
    unexpected, ignored, mismatched = [], [], []
    for official_key, value in state.items():
        if _always_ignored(official_key, task):
            ignored.append(official_key)
            continue
        key, may_be_absent = _renamed(official_key, config, renames)
        if key is None or key not in ours:
            (ignored if may_be_absent else unexpected).append(official_key)
            continue
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"checkpoint key {official_key!r} holds a {type(value).__name__}, not a tensor")
        if key.replace("visual_encoder_m.", "visual_encoder.", 1) == POSITIONAL_EMBEDDING and value.dim() == 2 and value.shape[1] == ours[key].shape[1]:
            value = resize_positional_embedding(value, ours[key].shape[0]) if value.shape != ours[key].shape else value
        if dtype_kind(value) != dtype_kind(ours[key]):
            mismatched.append(f"{official_key} -> {key}: checkpoint dtype {value.dtype}, model {ours[key].dtype} (a "
                              f"{dtype_kind(value)} tensor is not cast into a {dtype_kind(ours[key])} one)")
            continue
        if value.shape != ours[key].shape:
            note = " (nlvr_head reads the two fused [CLS] states side by side: 2 x hidden)" if key.startswith("nlvr_head.") else ""
            mismatched.append(f"{official_key} -> {key}: checkpoint {tuple(value.shape)}, model {tuple(ours[key].shape)}{note}")
            continue
        loadable[key] = value
    if mismatched:
        raise ValueError("checkpoint shapes do not fit the model:\n  " + "\n  ".join(mismatched))
    return loadable, unexpected, ignored


def dtype_kind(tensor: torch.Tensor) -> str:
    """bool, integer, floating or complex (load_state_dict would cast across them silently)."""
    if tensor.dtype == torch.bool:
        return "bool"
    return "complex" if tensor.is_complex() else "floating" if tensor.is_floating_point() else "integer"


def _grounding_rows(state: Dict[str, torch.Tensor], config) -> Tuple[torch.Tensor, torch.Tensor]:
    """(our token ids, the file's token ids) of the grounding prefix and coordinate levels, in the same order; the
    file's come from its prefix_ids [1] and target_ids [levels] buffers."""
    buffers = {name: state.get(name) for name in ("prefix_ids", "target_ids")}
    tokens = grounding_tokens(config)
    for name, ids in buffers.items():
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dim() != 1:
            raise ValueError(
                f"task='grounding' reads the file's {name} buffer (1-D integer token ids, saved by the authors' "
                f"grounding model) to place the coordinate tokens; got {describe(ids) if name in state else 'no such key'}"
            )
    if buffers["prefix_ids"].numel() != 1 or buffers["target_ids"].numel() != tokens.levels:
        raise ValueError(
            f"prefix_ids / target_ids: the file has {buffers['prefix_ids'].numel()} prefix and "
            f"{buffers['target_ids'].numel()} coordinate tokens (image_res {buffers['target_ids'].numel() - 1} + 1 levels); "
            f"the model needs 1 and {tokens.levels} (image_size {config.image_size} + 1)"
        )
    theirs = torch.cat([buffers["prefix_ids"], buffers["target_ids"]]).long().cpu()
    if theirs.unique().numel() != theirs.numel():
        raise ValueError(f"prefix_ids / target_ids must be {theirs.numel()} distinct token ids (one per coordinate level), "
                         f"got {theirs.unique().numel()} distinct: {theirs.tolist()[:12]}...")
    if bool(((theirs < 0) | (theirs >= config.vocab_size)).any()):
        raise ValueError(f"prefix_ids / target_ids hold token ids outside the vocabulary [0, {config.vocab_size}): {theirs.tolist()}")
    ours = torch.cat([torch.tensor([tokens.prefix]), torch.arange(tokens.levels) + tokens.first_coordinate])
    return ours, theirs


def _move_grounding_rows(loadable: Dict[str, torch.Tensor], ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """In every decoder tensor indexed by token id, row ours[i] takes the file's row theirs[i] (the file's tensors
    are not modified); the other rows keep the file's values."""
    for key, value in loadable.items():
        if key.replace("text_decoder_m.", "text_decoder.", 1) in DECODER_VOCABULARY:
            moved = value.clone()
            moved[ours.to(value.device)] = value[theirs.to(value.device)]
            loadable[key] = moved


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
    if task is None:
        return head not in CLASSIFIER_HEADS.values()
    return head in TASK_MODULES[task]
