"""Full-model rows: mPLUG training step and VQA generation, our fused model vs the authors' eager math without cache.

"fused": attention backend "auto" (the fastest available kernel) and the decoder's KV cache.
"eager": the "reference" backend (plain PyTorch math, the sdpa-free path) and no KV cache (the whole prefix
re-run every step), the way the authors' code generates.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, List, Optional, Tuple

import torch

from bench.common import bench_dtype, peak_memory_mb, progress, time_ms
from bench.fusion import CONFIGS
from mplug import MPLUG, MPLUGConfig

SETUPS = {
    "fused": {"backend": "auto", "use_cache": True, "label": "fused (auto backend, KV cache)"},
    "eager": {"backend": "reference", "use_cache": False, "label": "eager math (reference backend), no KV cache"},
}
TASKS = ("train_step", "vqa_generate")
CPU_IMAGE_SIZE = {"base": 256, "large": 224}
QUESTION_LEN = 25
NUM_BEAMS = 5
ANSWER_TOKENS = 10


def build_model(config: MPLUGConfig, device: torch.device, dtype: torch.dtype) -> MPLUG:
    """mPLUG with seeded random weights (the same weights for every setup)."""
    torch.manual_seed(0)
    return MPLUG(config).to(device=device, dtype=dtype)


def make_batch(config: MPLUGConfig, batch: int, device: torch.device, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """Random images [B, 3, S, S], question/caption ids [B, 25] starting with the start token, all-True masks."""
    generator = torch.Generator(device="cpu").manual_seed(2)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator)
    ids = torch.randint(config.mask_token_id + 1, config.vocab_size, (batch, QUESTION_LEN), generator=generator)
    ids[:, 0] = config.bos_token_id
    return {
        "images": images.to(device=device, dtype=dtype),
        "text_ids": ids.to(device),
        "text_mask": torch.ones(batch, QUESTION_LEN, dtype=torch.bool, device=device),
    }


def train_step_function(model: MPLUG, inputs: Dict[str, torch.Tensor]) -> Callable[[], None]:
    """One pretraining step: the four losses (ITC, ITM, MLM, PrefixLM) summed, backward (no optimizer update)."""

    def train_step():
        model.train()
        model.zero_grad(set_to_none=True)
        losses = model.pretrain_losses(inputs["images"], inputs["text_ids"], inputs["text_mask"])
        sum(loss.float() for loss in losses.values()).backward()

    return train_step


def generate_function(model: MPLUG, inputs: Dict[str, torch.Tensor], use_cache: bool) -> Callable[[], object]:
    """VQA beam search, beam 5, up to 10 tokens; the end token is banned before token 10 (min_length 9), so random
    weights cannot stop the search early and every setup decodes the same number of steps."""

    def generate():
        model.eval()
        with torch.no_grad():
            return model.vqa_generate(
                inputs["images"], inputs["text_ids"], inputs["text_mask"], num_beams=NUM_BEAMS,
                min_length=ANSWER_TOKENS - 1, max_length=ANSWER_TOKENS, use_cache=use_cache,
            )

    return generate


def task_function(model: MPLUG, inputs: Dict[str, torch.Tensor], setup: str, task: str) -> Callable[[], object]:
    """Switch model to the setup's backend and return the task's zero-argument callable."""
    model.set_attn_backend(SETUPS[setup]["backend"])
    if task == "train_step":
        return train_step_function(model, inputs)
    return generate_function(model, inputs, SETUPS[setup]["use_cache"])


def measure(task: str, setup: str, function: Callable[[], object], batch: int, device, min_run_time: float) -> dict:
    """One row: ms per call, items (training samples or answers) per second, peak memory."""
    row = {"benchmark": "model", "task": task, "setup": setup, "label": SETUPS[setup]["label"], "batch": batch}
    try:
        ms = time_ms(function, device, min_run_time=min_run_time)
        row.update(ms=ms, per_second=batch / (ms * 1e-3), peak_memory_mb=peak_memory_mb(function, device))
    except Exception as error:  # a failing task (missing, out of memory) is reported in the table, not fatal
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
    return row


def run(
    device: torch.device, config_name: str = "base", batch: Optional[int] = None, min_run_time: float = 0.2
) -> Tuple[List[dict], dict]:
    """(rows, extra JSON fields): train_step and vqa_generate for the fused and eager setups.

    GPU: batch 32 at the config's image size (384 for base: Lv 577). CPU: batch 2 at the pretraining image
    size 256 (Lv 257) for base/large, so the rows finish in a minute or two.
    """
    config = CONFIGS[config_name](dropout=0.0)
    if device.type == "cpu" and config_name != "tiny":
        config = config.replace(image_size=CPU_IMAGE_SIZE[config_name])
    dtype = bench_dtype(device)
    batch = batch or (32 if device.type == "cuda" else 2)
    model = build_model(config, device, dtype)
    inputs = make_batch(config, batch, device, dtype)
    rows = []
    for setup, task in progress(list(itertools.product(SETUPS, TASKS)), "model"):
        rows.append(measure(task, setup, task_function(model, inputs, setup, task), batch, device, min_run_time))
    return rows, {
        "benchmark": "model",
        "config": config_name,
        "batch": batch,
        "image_size": config.image_size,
        "vision_len": config.num_visual_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "generation": f"beam {NUM_BEAMS}, {ANSWER_TOKENS} answer tokens, question length {QUESTION_LEN}",
        "train_step": "pretrain_losses (ITC + ITM + MLM + PrefixLM) forward + backward, no optimizer update",
        "speedups": speedups(rows),
    }


def speedups(rows: List[dict]) -> Dict[str, float]:
    """fused / eager throughput per task (only where both were measured)."""
    rate = {(row["task"], row["setup"]): row.get("per_second") for row in rows}
    return {
        task: rate[(task, "fused")] / rate[(task, "eager")]
        for task in TASKS
        if rate.get((task, "fused")) and rate.get((task, "eager"))
    }

