"""Full-model rows: mPLUG training step and VQA generation, our fused model vs the authors' eager math without cache.

"fused": attention backend "auto" (the fastest available kernel; the backends that actually ran are recorded
from the dispatcher's ranges) and the decoder's KV cache.
"eager": the "reference" backend (plain PyTorch math, the sdpa-free path) and no KV cache (the whole prefix
re-run every step), the way the authors' code generates.
Both setups of a task are timed interleaved (bench.common.measure) on one model; the ratio fused/eager is
paired per round.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from bench.common import TimingPolicy, bench_dtype, measure, paired_ratio, progress
from bench.fusion import CONFIGS
from bench.tables import model_label
from mplug import MPLUG, MPLUGConfig

SETUPS = {  # rows are labelled by the attention backends that actually ran (bench.tables.model_label)
    "fused": {"backend": "auto", "use_cache": True},
    "eager": {"backend": "reference", "use_cache": False},
}
TASKS = ("train_step", "vqa_generate")
CPU_IMAGE_SIZE = {"base": 256, "large": 224}
GPU_BATCH, CPU_BATCH = 32, 2  # 2: the training step's ITM hard negatives need a second sample
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
        losses = model.pretrain_losses(inputs["images"], inputs["text_ids"], inputs["text_mask"])
        sum(loss.float() for loss in losses.values()).backward()
        model.zero_grad(set_to_none=True)  # every call starts without gradients: its peak memory holds a full set

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
    """A zero-argument callable that switches model to the setup's backend, then runs the task."""
    function = (train_step_function(model, inputs) if task == "train_step"
                else generate_function(model, inputs, SETUPS[setup]["use_cache"]))

    def run():
        model.set_attn_backend(SETUPS[setup]["backend"])
        return function()

    return run


def task_rows(task: str, timings: dict, batch: int) -> List[dict]:
    """One row per setup: timing fields, items (training samples or answers) per second, the resolved label."""
    rows = []
    for setup, timing in timings.items():
        row = {"benchmark": "model", "task": task, "setup": setup, "batch": batch, **timing.row()}
        row["label"] = model_label(row)
        if timing.error is None:
            row["per_second"] = batch / (row["ms_median"] * 1e-3)
        rows.append(row)
    return rows


def run(
    device: torch.device, policy: TimingPolicy, config_name: str = "base", batch: Optional[int] = None,
    image_size: Optional[int] = None, tasks: Sequence[str] = TASKS,
) -> Tuple[List[dict], List[dict], dict]:
    """(rows, ratio rows, extra JSON fields): the tasks for the fused and eager setups, interleaved per task.

    GPU: batch 32 at the config's image size (384 for base: Lv 577). CPU: batch 2 (ITM's hard negatives need 2) at image_size or
    CPU_IMAGE_SIZE (base and large), so the rows fit the CPU time budget.
    """
    config = CONFIGS[config_name](dropout=0.0)
    if device.type == "cpu" and config_name != "tiny":
        config = config.replace(image_size=image_size or CPU_IMAGE_SIZE[config_name])
    dtype = bench_dtype(device)
    batch = batch or (GPU_BATCH if device.type == "cuda" else CPU_BATCH)
    model = build_model(config, device, dtype)
    inputs = make_batch(config, batch, device, dtype)
    rows, ratios = [], []
    for task in progress(list(tasks), "model"):
        timings = measure({setup: task_function(model, inputs, setup, task) for setup in SETUPS}, device, policy)
        rows += task_rows(task, timings, batch)
        ratio = paired_ratio(timings["fused"], timings["eager"])
        if ratio is not None:
            ratios.append({"benchmark": "model", "ratio": "fused/eager", "task": task, **ratio.row()})
    resolved = {setup: sorted({name for row in rows if row["setup"] == setup for name in row.get("attention_backends", [])})
                for setup in SETUPS}
    return rows, ratios, {
        "benchmark": "model",
        "config": config_name,
        "batch": batch,
        "image_size": config.image_size,
        "vision_len": config.num_visual_tokens,
        "dtype": str(dtype).replace("torch.", ""),
        "resolved_backends": resolved,
        "generation": f"beam {NUM_BEAMS}, {ANSWER_TOKENS} answer tokens, question length {QUESTION_LEN}",
        "train_step": "pretrain_losses (ITC + ITM + MLM + PrefixLM) forward + backward, no optimizer update",
    }
