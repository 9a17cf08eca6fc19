"""Run-config keys that choose between the authors' behaviour (AliceMind mPLUG/) and ours, and their checks."""
from __future__ import annotations

from mplug.run.config_checks import as_float, check_int

ITC_BANKS = ("local", "global")  # local: the authors' (this process's batch + queue); global: every process's batch + queue
SCHEDULE_KINDS = ("cosine", "authors")  # cosine: ours, per step; authors: scheduler/cosine_lr.py as their scripts step it
AUTHORS_STEP_SIZE = 100  # their warm-up is stepped every 100 iterations (vqa_mplug.py:46, caption_mplug.py)

# Top-level keys with their defaults (the schedule's "kind" and "warmup_lr" sit in run_config.DEFAULTS["schedule"]).
DEFAULTS = {
    "itc_bank": "local",
    "add_ocr": False,
    "add_object": False,
    "accumulate_steps": 1,  # batches per optimiser step (mplug.run.accumulate); the authors' caption --accum_steps 4
    "accumulate_last_group": "carry",  # an epoch's last len(loader) % accumulate_steps batches (mplug.run.accumulate)
    "scst": False,  # caption only: self-critical training (mplug.run.scst), the authors' caption_mplug_scst.py
    "scst_mode": "authors",  # authors: top beams with gradients, mean baseline; sample: ours (sampled, greedy baseline)
    "prompt_mode": "authors",  # caption prompt: authors (caption_mplug.py) or vatex (model_caption_mplug_vatex.py)
}
SCST_MODES = ("authors", "sample")
# carry: the authors' caption_mplug.py:66-79 (no zero_grad at an epoch's start: the next epoch's first step takes them);
# drop: ours before, never drawn.
LAST_GROUP_MODES = ("carry", "drop")
# authors: caption_mplug.py:50-51, prompt + caption joined without a space, the prompt's tokens in the loss;
# vatex: model_caption_mplug_vatex.py:32,66-68, "prompt caption", the prompt's tokens not predicted.
PROMPT_MODES = ("authors", "vatex")


def check_authors_options(cfg: dict) -> None:
    """itc_bank, schedule.kind, schedule.warmup_lr, add_ocr, add_object, accumulate_steps, accumulate_last_group, scst,
    scst_mode and prompt_mode of the allowed values
    (ValueError naming the key)."""
    for key, allowed in (("itc_bank", ITC_BANKS), ("schedule.kind", SCHEDULE_KINDS)):
        *parent, leaf = key.split(".")
        value = (cfg[parent[0]] if parent else cfg)[leaf]
        if value not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {value!r}")
    for key, allowed in (("scst_mode", SCST_MODES), ("prompt_mode", PROMPT_MODES), ("accumulate_last_group", LAST_GROUP_MODES)):
        if cfg[key] not in allowed:
            raise ValueError(f"config key {key!r} must be one of {allowed}, got {cfg[key]!r}")
    if cfg["scst"] is True and cfg.get("task") not in (None, "caption"):
        raise ValueError(f"config key 'scst' is for task 'caption' only, got task {cfg.get('task')!r}")
    for key in ("add_ocr", "add_object", "scst"):
        if not isinstance(cfg[key], bool):
            raise ValueError(f"config key {key!r} must be true or false, got {cfg[key]!r}")
    check_int("accumulate_steps", cfg["accumulate_steps"], 1)
    schedule = cfg["schedule"]
    schedule["warmup_lr"] = warmup_lr = as_float("schedule.warmup_lr", schedule["warmup_lr"], True)
    if schedule["kind"] == "authors":
        if warmup_lr is None:
            raise ValueError("config key 'schedule.warmup_lr' must be set when schedule.kind is 'authors' (their warmup_lr)")
        if cfg["accumulate_steps"] > 1:
            raise ValueError("schedule.kind 'authors' steps by batches (their scheduler.step(i // 100)) and "
                             "accumulate_steps > 1 counts optimiser steps: set accumulate_steps 1 or schedule.kind cosine")
        if schedule["warmup_ratio"] is not None or schedule["warmup_steps"] % AUTHORS_STEP_SIZE:
            raise ValueError(f"schedule.kind 'authors' takes schedule.warmup_steps as a multiple of {AUTHORS_STEP_SIZE} "
                             f"(their warmup_epochs x {AUTHORS_STEP_SIZE} iterations) and no warmup_ratio")
