"""Argument checks of the model's entry points (pretraining losses, generation, retrieval, checkpoint loading).

Each check raises, before any work is done, a ValueError or TypeError that names the argument, what it got and
what is allowed.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from typing import Dict, Iterable, Optional, Tuple

import torch


def describe(x) -> str:
    """'shape (..), dtype ..' of a tensor, else its type name."""
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def check_images(name: str, images, min_batch: int = 1) -> None:
    """images must be a floating tensor [B, 3, H, W] with B >= min_batch."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point() or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{name} must be a float tensor [B, 3, H, W], got {describe(images)}")
    if images.shape[0] < min_batch:
        raise ValueError(f"{name} must hold at least {min_batch} image(s), got {describe(images)}")


def text_inputs(
    ids_name: str, ids, mask_name: str, mask, batch: Optional[int] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids as long [B, L], bool mask [B, L]) from integer ids (int32 accepted) and a bool or 0/1 integer mask (None = all ones).

    Every row must keep at least its [CLS] and [SEP] tokens; ``batch`` (when given) is the images' batch size.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{ids_name} must be an int64 (or int32) tensor [B, L] of token ids, got {describe(ids)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{ids_name} must hold at least one text of at least one token, got {describe(ids)}")
    if batch is not None and ids.shape[0] != batch:
        raise ValueError(f"images has batch {batch} but {ids_name} has batch {ids.shape[0]} ({describe(ids)}); they must match")
    if mask is None:
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape) or mask.is_floating_point():
        raise ValueError(f"{mask_name} must be a bool tensor shaped like {ids_name} {tuple(ids.shape)} (or None), got {describe(mask)}")
    mask = mask.bool()
    short = (mask.sum(dim=1) < 2).nonzero().flatten().tolist()
    if short:
        raise ValueError(
            f"{mask_name}: rows {short} attend to fewer than 2 tokens; every text needs at least [CLS] and [SEP]"
        )
    return ids.long(), mask


def check_positive_int(name: str, value) -> None:
    """value must be an int >= 1 (bool refused)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")


def check_generation(config, prompt_ids: Optional[torch.Tensor], num_beams, max_length, num_return_sequences) -> None:
    """num_beams, max_length and num_return_sequences are ints >= 1, and the prompt (None = one [CLS]) plus
    max_length - 1 fed tokens fit the decoder's positions."""
    check_positive_int("num_beams", num_beams)
    check_positive_int("max_length", max_length)
    check_positive_int("num_return_sequences", num_return_sequences)
    prompt_length = prompt_ids.shape[-1] if isinstance(prompt_ids, torch.Tensor) and prompt_ids.dim() else 1
    longest = prompt_length + max_length - 1
    if longest > config.max_position_embeddings:
        raise ValueError(
            f"max_length {max_length} with a prompt of {prompt_length} token(s) feeds the decoder {longest} positions; "
            f"it has max_position_embeddings = {config.max_position_embeddings}: use max_length <= "
            f"{config.max_position_embeddings - prompt_length + 1}"
        )


def check_finite_rows(name: str, features: torch.Tensor) -> None:
    """features [N, E] must be finite; else ValueError naming the rows (images or texts) that are not."""
    bad = (~torch.isfinite(features)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name} {bad[:10]}{' ...' if len(bad) > 10 else ''} give non-finite features (NaN or inf); "
                         f"they cannot be ranked: check those inputs")


def load_checkpoint_file(path, weights_only: bool):
    """torch.load(path) on the CPU; a file that is not a PyTorch checkpoint raises ValueError naming it."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {os.fspath(path)!r} is not a file")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except (EOFError, KeyError, IndexError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, UnicodeDecodeError) as error:
        raise ValueError(
            f"checkpoint {os.fspath(path)!r} ({os.path.getsize(path)} bytes) is not a PyTorch checkpoint that "
            f"torch.load(weights_only={weights_only}) can read ({type(error).__name__}: {error})"
        ) from error


def check_state_dict_keys(state_dict: Dict) -> None:
    """Every key of a checkpoint's state dict must be a str."""
    bad = [key for key in state_dict if not isinstance(key, str)]
    if bad:
        raise TypeError(f"checkpoint keys must be str; got {len(bad)} other key(s), e.g. {bad[0]!r} ({type(bad[0]).__name__})")


def check_own_layout(keys: Iterable[str], text_layers: int) -> None:
    """Refuse a state dict of our own MPLUG (model.state_dict()): the authors' loader would shift its fusion layers."""
    keys = list(keys)
    fusion_layers = [int(key.split(".")[3]) for key in keys if key.startswith("fusion_encoder.encoder.layer.")]
    ours = any(key.startswith("mlm_head.") for key in keys) or (fusion_layers and max(fusion_layers) < text_layers)
    if ours:
        raise ValueError(
            "this state dict is in our MPLUG layout (mlm_head.*, fusion layers numbered from 0), not the authors': "
            "load_official_checkpoint would map fusion layer 6 + k onto k; load it with model.load_state_dict instead"
        )


def non_finite_entries(name_values: Dict[str, torch.Tensor], strict: bool) -> None:
    """Warn (raise ValueError when strict) naming every floating tensor that holds NaN or inf."""
    bad = [name for name, value in name_values.items() if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if not bad:
        return
    message = f"checkpoint tensors with NaN or inf values: {bad}"
    if strict:
        raise ValueError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
