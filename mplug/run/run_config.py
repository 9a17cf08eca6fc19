"""Run configurations of ``mplug.run.train`` / ``mplug.run.evaluate``: the shipped YAMLs (mplug/run/configs/<task>_<size>.yaml) or a
user's YAML, with ``key=value`` overrides, checked against one table of allowed keys."""
from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Sequence


from mplug.model.config import MPLUGConfig
from mplug.run.authors_options import DEFAULTS as AUTHORS_DEFAULTS, check_authors_options
from mplug.run.config_checks import DEFAULT_MAX_PIXELS, check_values, load_yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
TASKS = ("vqa", "caption", "retrieval", "pretrain", "ve", "nlvr", "grounding")
MODELS = ("tiny", "base", "large")
SHIPPED = tuple(f"{task}_{size}" for task in TASKS for size in ("base", "large")) + ("caption_base_scst", "caption_large_scst")
PATH_KEYS = ("train_file", "test_file", "answer_list", "image_root", "vqa_root", "vg_root", "gqa_root", "vocab")

# Every allowed key with its default; a shipped or user YAML sets any subset.
DEFAULTS = {
    "task": None,
    "model": "base",
    "image_size": 384,
    "seed": 42,
    "epochs": 1,
    "max_steps": None,
    "batch_size_train": 8,
    "batch_size_test": 8,
    "num_workers": 4,
    "max_grad_norm": 1.0,
    "skip_non_finite_steps": 0,
    "grad_checkpointing": False,
    "log_every": 50,
    "save_every": 0,
    "optimizer": {"lr": 1.0e-5, "lr_visual": 1.0e-5, "lr_head": None, "weight_decay": 0.02, "betas": [0.9, 0.999]},
    "schedule": {"warmup_steps": 0, "warmup_ratio": None, "min_lr": 1.0e-6, "kind": "cosine", "warmup_lr": None},
    "max_words": 30,
    "max_tokens": 40,
    "answer_max_words": 10,
    "num_beams": 5,
    "min_length": 1,
    "max_length": 10,
    "k_test": 256,
    "prompt": "",
    "num_frames": None,  # video evaluation: frames per video (null = the authors' count, mplug.run.data.video)
    "max_image_pixels": DEFAULT_MAX_PIXELS,
    # grounding training augmentation switches (mplug.run.data.grounding_augment.Augment; the authors' aug_* keys)
    "aug_scale": True,
    "aug_crop": True,
    "aug_translate": True,
    "aug_blur": False,
    **{key: None for key in PATH_KEYS},
    **AUTHORS_DEFAULTS,
}



def allowed_keys() -> list:
    """Every settable key, nested ones dotted (``optimizer.lr``)."""
    keys = []
    for key, value in DEFAULTS.items():
        keys += [f"{key}.{sub}" for sub in value] if isinstance(value, dict) else [key]
    return keys


def load_config(name_or_path: str, overrides: Sequence[str] = ()) -> dict:
    """A shipped config name (``vqa_base``, ...) or a YAML path, then ``key=value`` overrides (values parsed as YAML,
    dotted keys reach nested dicts) -> the checked config dict with every key of DEFAULTS."""
    source = _config_file(name_or_path)
    with open(source) as handle:
        loaded = load_yaml(handle, str(source)) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{source}: a config must be a YAML mapping of keys to values, got {type(loaded).__name__}")
    cfg = copy.deepcopy(DEFAULTS)
    base = None if name_or_path in SHIPPED else source.parent
    for key, value in _flatten(loaded):
        _set(cfg, key, _resolve(key, value, base), f"{source}")
    for override in overrides:
        key, value = _parse_override(override)
        _set(cfg, key, _resolve(key, value, Path.cwd()), "--set")
    return _checked(cfg)


def build_model_config(cfg: dict) -> MPLUGConfig:
    """The MPLUGConfig of cfg["model"] ("tiny", "base" or "large") at cfg["image_size"]."""
    return getattr(MPLUGConfig, cfg["model"])(image_size=cfg["image_size"])


def _config_file(name_or_path: str) -> Path:
    if name_or_path in SHIPPED:
        return CONFIG_DIR / f"{name_or_path}.yaml"
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"config {name_or_path!r} is neither a shipped config {SHIPPED} nor an existing YAML file")
    return path.resolve()


def _flatten(mapping: dict, prefix: str = ""):
    """(dotted key, value) pairs of a YAML mapping, descending into the nested dicts DEFAULTS has."""
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(DEFAULTS.get(dotted), dict):
            yield from _flatten(value, f"{dotted}.")
        else:
            yield dotted, value


def _parse_override(override: str):
    if not isinstance(override, str) or "=" not in override:
        raise ValueError(f"an override must be 'key=value' (e.g. optimizer.lr=1e-4), got {override!r}")
    key, text = override.split("=", 1)
    return key.strip(), load_yaml(text, f"--set {key.strip()}")


def _set(cfg: dict, key: str, value, where: str) -> None:
    if key not in allowed_keys():
        raise ValueError(f"{where}: unknown config key {key!r}; allowed keys: {', '.join(allowed_keys())}")
    *parents, leaf = key.split(".")
    target = cfg
    for parent in parents:
        target = target[parent]
    target[leaf] = value


def _resolve(key: str, value, base):
    """Relative data paths against base (a user YAML's folder, or the working directory for overrides)."""
    if key not in PATH_KEYS or value is None or base is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_resolve(key, item, base) for item in value]
    if not isinstance(value, str):
        raise ValueError(f"config key {key!r} must be a path (or a list of paths for train_file), got {value!r}")
    return str(base / Path(value).expanduser())


def _checked(cfg: dict) -> dict:
    check_values(cfg, TASKS, MODELS, PATH_KEYS)
    check_authors_options(cfg)
    try:
        build_model_config(cfg)
    except (ValueError, TypeError) as error:
        raise ValueError(f"config keys 'model' {cfg['model']!r} and 'image_size' {cfg['image_size']!r} do not make a "
                         f"model: {error}") from None
    return cfg


def run_arguments(tasks: Sequence[str], output_help: str) -> argparse.ArgumentParser:
    """The arguments mplug.run.train and mplug.run.evaluate share (--task, --config, --set, --output,
    --skip-bad-records), as a parent parser."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--task", required=True, choices=tasks)
    parser.add_argument("--config", required=True, help="a shipped config name (vqa_base, ...) or a YAML file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                        help="override a config key (dotted for nested keys: optimizer.lr=1e-4); repeatable")
    parser.add_argument("--output", required=True, help=output_help)
    parser.add_argument("--skip-bad-records", action="store_true", help="drop (and count) records that cannot be read")
    parser.add_argument("--overwrite", action="store_true", help="replace the run or results already in --output")
    parser.add_argument("--partial-load", action="store_true",
                        help="accept a --checkpoint that fills only part of the model (the rest stays as initialised)")
    return parser
