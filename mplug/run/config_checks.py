"""Type and range checks of every run-config key (mplug.run.run_config), each refusal a ValueError naming its key, and
the YAML loader that refuses aliases (an alias bomb of a few hundred bytes expands to gigabytes)."""
from __future__ import annotations

import math

import yaml

INT_LIMIT = 2**31 - 1  # larger counts and sizes are typos; seeds must stay below 2**32 (numpy's seeding)
SEED_LIMIT = 2**32 - 1 - 4096  # seed + rank, seed + worker id must stay numpy seeds
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's MAX_IMAGE_PIXELS: max_image_pixels' default (mplug.run.data.images)
POSITIVE_INTS = ("image_size", "epochs", "batch_size_train", "batch_size_test", "log_every", "max_words", "max_tokens",
                 "answer_max_words", "num_beams", "max_length", "k_test")
BOOLS = ("grad_checkpointing", "aug_scale", "aug_crop", "aug_translate", "aug_blur")
NON_NEGATIVE_INTS = ("num_workers", "save_every", "min_length", "skip_non_finite_steps", "schedule.warmup_steps")
# float key -> (may be null, upper bound or None)
FLOATS = {"max_grad_norm": (False, None), "optimizer.lr": (False, None), "optimizer.lr_visual": (False, None),
          "optimizer.lr_head": (True, None), "optimizer.weight_decay": (False, None),
          "schedule.warmup_ratio": (True, 1.0), "schedule.min_lr": (False, None)}


class NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors' aliases (``*name``), naming the file."""

    source = "<config>"

    def compose_node(self, parent, index):
        """The node at this point; an alias raises ValueError."""
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ValueError(f"{self.source}: YAML aliases (*{event.anchor}, line {event.start_mark.line + 1}) are not "
                             f"allowed in a run config; write the values out")
        return super().compose_node(parent, index)


def load_yaml(text_or_stream, source: str):
    """yaml.safe_load without aliases; a YAML syntax error is a ValueError naming ``source``."""
    loader = NoAliasLoader(text_or_stream)
    loader.source = source
    try:
        return loader.get_single_data()
    except yaml.YAMLError as error:
        raise ValueError(f"{source}: not valid YAML ({error})") from None
    finally:
        loader.dispose()


def get(cfg: dict, key: str):
    """cfg's value of a dotted key."""
    *parents, leaf = key.split(".")
    for parent in parents:
        cfg = cfg[parent]
    return cfg[leaf]


def put(cfg: dict, key: str, value) -> None:
    """Set cfg's value of a dotted key."""
    *parents, leaf = key.split(".")
    for parent in parents:
        cfg = cfg[parent]
    cfg[leaf] = value


def is_int(value) -> bool:
    """An int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(key: str, value, low: int, high: int = INT_LIMIT) -> None:
    """value must be an int in [low, high]."""
    if not is_int(value) or not low <= value <= high:
        raise ValueError(f"config key {key!r} must be an int >= {low} (and <= {high}), got {value!r}")


def as_float(key: str, value, optional: bool, high=None):
    """value (a number or a numeric string: YAML reads 1e-5 as one) as a finite float >= 0 (<= high); None if optional."""
    if value is None and optional:
        return None
    number = None
    if isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            number = float(value)
        except (ValueError, OverflowError):
            number = None
    if number is None or not math.isfinite(number) or number < 0.0 or (high is not None and number > high):
        allowed = f"a number (finite, in [0, {high}])" if high is not None else "a number (finite, >= 0)"
        raise ValueError(f"config key {key!r} must be {allowed}{' or null' if optional else ''}, got {value!r}")
    return number


def check_paths(cfg: dict, path_keys) -> None:
    """Path keys hold null or a path; train_file may also hold a non-empty list of paths."""
    for key in path_keys:
        value = cfg[key]
        if value is None or isinstance(value, str):
            continue
        if key == "train_file" and isinstance(value, list) and value and all(isinstance(item, str) for item in value):
            continue
        allowed = "null, a path or a non-empty list of paths" if key == "train_file" else "null or a path"
        raise ValueError(f"config key {key!r} must be {allowed}, got {value!r}")


def check_values(cfg: dict, tasks, models, path_keys) -> None:
    """Every key of a merged config (DEFAULTS' keys) of the allowed type and range; floats become floats in place."""
    for key, allowed in (("task", tasks), ("model", models)):
        if not isinstance(cfg[key], str) or cfg[key] not in allowed:
            raise ValueError(f"config key {key!r} must be one of {tuple(allowed)}, got {cfg[key]!r}")
    for key in POSITIVE_INTS:
        check_int(key, get(cfg, key), 1)
    for key in NON_NEGATIVE_INTS:
        check_int(key, get(cfg, key), 0)
    check_int("seed", cfg["seed"], 0, SEED_LIMIT)
    if not is_int(cfg["max_image_pixels"]) or not 1 <= cfg["max_image_pixels"] <= 2 * DEFAULT_MAX_PIXELS:
        raise ValueError(f"config key 'max_image_pixels' must be an int in [1, {2 * DEFAULT_MAX_PIXELS}] (Pillow refuses "
                         f"images over twice its default limit {DEFAULT_MAX_PIXELS} itself), got {cfg['max_image_pixels']!r}")
    if cfg["max_steps"] is not None:
        check_int("max_steps", cfg["max_steps"], 1)
    if cfg["num_frames"] is not None:
        check_int("num_frames", cfg["num_frames"], 1)
    for key, (optional, high) in FLOATS.items():
        put(cfg, key, as_float(key, get(cfg, key), optional, high))
    if cfg["schedule"]["warmup_ratio"] is not None and cfg["schedule"]["warmup_steps"]:
        raise ValueError("config keys 'schedule.warmup_steps' and 'schedule.warmup_ratio': set one of them, not both")
    betas = cfg["optimizer"]["betas"]
    if not isinstance(betas, (list, tuple)) or len(betas) != 2:
        raise ValueError(f"config key 'optimizer.betas' must be two floats in [0, 1), got {betas!r}")
    betas = [as_float("optimizer.betas", beta, False, 1.0) for beta in betas]
    if not all(beta < 1.0 for beta in betas):
        raise ValueError(f"config key 'optimizer.betas' must be two floats in [0, 1), got {cfg['optimizer']['betas']!r}")
    cfg["optimizer"]["betas"] = betas
    if not isinstance(cfg["prompt"], str):
        raise ValueError(f"config key 'prompt' must be a string, got {cfg['prompt']!r}")
    for key in BOOLS:
        if not isinstance(cfg[key], bool):
            raise ValueError(f"config key {key!r} must be true or false, got {cfg[key]!r}")
    check_paths(cfg, path_keys)
