"""``torchrun --nproc-per-node N -m mplug.run.train --task vqa --config vqa_base --output DIR ...`` (or ``python -m
mplug.run.train`` as one process): fine-tune or pretrain mPLUG on the authors' annotation files with DDP (FSDP2 with
--fsdp), AdamW per parameter group, warm-up + cosine schedule, gradient clipping, bf16 autocast on CUDA, atomic
checkpoints every save_every steps and at epoch ends, bit-exact --resume on the CPU, and <output>/log.jsonl."""
from __future__ import annotations

import argparse
import inspect
import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from mplug.model.checkpoint import TASK_MODULES
from mplug.run.data.bad_images import SkippedImages
from mplug.model.fusion import FusionEncoder
from mplug.tasks.momentum import ramped_alpha
from mplug.run.run_config import TASKS, load_config, run_arguments
from mplug.run.schedules import build_authors_schedule
from mplug.run.runtime import (
    MOMENTUM_TASKS, DistInfo, atomic_write, build_model, close_distributed, init_distributed, is_main, load_weights,
)
from mplug.run.train_state import (
    LAST, Progress, check_same_run, check_same_world_size, read_checkpoint, restore, restore_rng, save_checkpoint,
)
from mplug.run.divergence import check_finite_weights, check_skipped, clip_and_check
from mplug.run.accumulate import accumulate_gradients, carried_batches, group_batches, step_inputs, steps_per_epoch
from mplug.run.output import LOG, json_line, open_run_output, read_log
from mplug.run.scst import ScstLoss

LOSS_METHODS = {"vqa": "vqa_loss", "caption": "caption_loss", "retrieval": "retrieval_loss", "pretrain": "pretrain_losses",
                "ve": "ve_loss", "nlvr": "nlvr_loss", "grounding": "grounding_loss"}
ENCODERS = ("visual_encoder", "text_encoder", "fusion_encoder", "text_decoder")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of mplug.run.train."""
    parser = argparse.ArgumentParser(prog="python -m mplug.run.train", description=__doc__.split("\n\n")[0],
                                     parents=[run_arguments(TASKS, "folder for checkpoints and log.jsonl")])
    parser.add_argument("--checkpoint", help="start from these weights (the authors' .pth or an mplug.run.train checkpoint)")
    parser.add_argument("--resume", metavar="DIR", help="continue the run whose checkpoint_last.pth is in DIR")
    parser.add_argument("--fsdp", action="store_true", help="shard parameters with FSDP2 fully_shard instead of DDP")
    return parser.parse_args(argv)


class TaskLoss(nn.Module):
    """The task's loss method as the forward, so DDP/FSDP see every step: inputs -> scalar or dict of losses."""

    def __init__(self, model: nn.Module, task: str):
        super().__init__()
        self.model = model
        self.method = LOSS_METHODS[task]

    def forward(self, **inputs):
        return getattr(self.model, self.method)(**inputs)


def fully_shard_function():
    """FSDP2's fully_shard from torch.distributed.fsdp, with the ignored_params that keeps the 0-d temp out of it (the
    torch 2.4/2.5 copy in torch.distributed._composable.fsdp has no ignored_params and cannot take MPLUG)."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        from torch.distributed._composable.fsdp import fully_shard
    if "ignored_params" not in inspect.signature(fully_shard).parameters:
        raise ValueError(f"--fsdp needs a torch whose fully_shard takes ignored_params (FSDP2 cannot shard the 0-d "
                         f"parameter temp); torch {torch.__version__} has none: use DDP (no --fsdp) or a newer torch")
    return fully_shard


def parallel(step: TaskLoss, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP (the default) or FSDP2 around ``step``; ``step`` itself in one process. FSDP2 shards every layer of the
    vision, text and decoder stacks, each fusion encoder whole (it projects the vision K/V of several layers in one
    GEMM outside their forwards), then the rest."""
    if not dist.is_initialized():
        return step
    if fsdp:
        fully_shard = fully_shard_function()
        fusions = [module for module in step.modules() if isinstance(module, FusionEncoder)]
        inside_fusion = {id(sub) for fusion in fusions for sub in fusion.modules()}
        for module in list(step.modules()):
            if isinstance(module, nn.ModuleList) and id(module) not in inside_fusion:
                for layer in module:
                    fully_shard(layer)
        for fusion in fusions:
            fully_shard(fusion)
        # FSDP2 cannot shard 0-d parameters: temp stays out (frozen in the tasks --fsdp takes, see main)
        return fully_shard(step, ignored_params={parameter for parameter in step.parameters() if parameter.ndim == 0})
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(step, device_ids=device_ids, broadcast_buffers=False, static_graph=True)


def freeze_unused(model: nn.Module, task: str) -> None:
    """Parameters the task's loss never reaches (mplug.model.checkpoint.TASK_MODULES: e.g. the decoder in retrieval, the
    text encoder and fusion in captioning) stop requiring gradients, so the optimiser and DDP leave them alone;
    pretraining trains everything. A parameter tied into a trained module stays trained."""
    if task == "pretrain":
        return
    kept = set()
    for name in TASK_MODULES[task]:
        part = getattr(model, name)
        kept.update(id(parameter) for parameter in (part.parameters() if isinstance(part, nn.Module) else [part]))
    for parameter in model.parameters():
        if id(parameter) not in kept:
            parameter.requires_grad_(False)


def parameter_groups(model: nn.Module, optimizer_cfg: dict) -> list:
    """AdamW groups as the authors' create_two_optimizer (optim/optim_factory.py:141-167): the ViT (visual_encoder.visual)
    at lr_visual, heads (outside the encoders and decoder) at lr_head (lr when null), the rest at lr, the large
    models' visn_fc / visn_layer_norm included (theirs sit outside visual_encoder); no weight decay on names holding
    "bias" or "LayerNorm.weight"."""
    groups: Dict[tuple, list] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = name.split(".")[0]
        if name.startswith("visual_encoder.") and not name.startswith(("visual_encoder.visn_fc.", "visual_encoder.visn_layer_norm.")):
            lr = optimizer_cfg["lr_visual"]
        elif part not in ENCODERS and optimizer_cfg["lr_head"] is not None:
            lr = optimizer_cfg["lr_head"]
        else:
            lr = optimizer_cfg["lr"]
        decay = 0.0 if "bias" in name or "LayerNorm.weight" in name else optimizer_cfg["weight_decay"]
        groups.setdefault((lr, decay), []).append(parameter)
    return [{"params": params, "lr": lr, "weight_decay": decay} for (lr, decay), params in groups.items()]


def warmup_cosine(total_steps: int, warmup_steps: int, base_lr: float, min_lr: float):
    """LambdaLR factor of one group: linear warm-up to base_lr, then cosine from base_lr down to min_lr at total_steps."""
    floor = min(min_lr, base_lr) / base_lr if base_lr > 0 else 0.0

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def build_schedule(optimizer, schedule_cfg: dict, total_steps: int, epochs: int = 1, steps_per_epoch: int = 1):
    """Warm-up (warmup_steps, or warmup_ratio of total_steps) then cosine to min_lr, per parameter group; with
    schedule.kind "authors" the authors' schedule (mplug.run.schedules)."""
    if schedule_cfg.get("kind") == "authors":
        return build_authors_schedule(optimizer, schedule_cfg, epochs, steps_per_epoch)
    ratio = schedule_cfg["warmup_ratio"]
    warmup = round(ratio * total_steps) if ratio is not None else schedule_cfg["warmup_steps"]
    factors = [warmup_cosine(total_steps, warmup, group["lr"], schedule_cfg["min_lr"]) for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


def total_steps(cfg: dict, steps_per_epoch: int) -> int:
    """Optimiser steps of the whole run: epochs x steps per epoch, capped by max_steps."""
    steps = cfg["epochs"] * steps_per_epoch
    return steps if cfg["max_steps"] is None else min(steps, cfg["max_steps"])


def train_step(step_module, inputs: dict, optimizer, scheduler, parameters, max_grad_norm: float, device,
               accumulate_steps: int = 1):
    """One optimiser step on one batch (or a list of micro-batches, mplug.run.accumulate) -> (the detached losses
    ("loss" = their sum, and each part for dict losses), whether the step was taken: a non-finite loss or gradient on
    any rank skips the optimiser update)."""
    loss, parts = accumulate_gradients(step_module, inputs, optimizer, device, accumulate_steps)
    finite = clip_and_check(loss, parameters, max_grad_norm)
    if finite:
        optimizer.step()
    scheduler.step()
    return {"loss": loss, **parts}, finite


def mean_over_ranks(losses: Dict[str, torch.Tensor]) -> Dict[str, float]:
    """Every loss averaged over the processes (as floats)."""
    names = sorted(losses)
    values = torch.stack([losses[name].float() for name in names])
    if dist.is_initialized():
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return dict(zip(names, values.tolist()))


def peak_memory(device: torch.device) -> dict:
    """The peak memory field of a log line: CUDA's max allocated bytes on a GPU, the process's max RSS on the CPU."""
    if device.type == "cuda":
        return {"peak_cuda_allocated_bytes": torch.cuda.max_memory_allocated(device)}
    return {"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def keep_log_lines_until(path: Path, step: int) -> None:
    """Drop the lines of log.jsonl after ``step`` (a killed run logged steps its last checkpoint does not hold; the
    resumed run logs them again; a new run starts an empty log)."""
    if not path.exists():
        return
    kept = [json_line(record) for record in read_log(path) if record["step"] <= step]
    atomic_write(path, lambda stream: stream.writelines(kept), binary=False)


class Logger:
    """log.jsonl lines (rank 0) and the tqdm bar of rank 0; samples/s over the steps since the last line."""

    def __init__(self, output: Path, progress: Progress, total: int, samples_per_step: int, device):
        self.path = output / LOG
        if is_main():
            keep_log_lines_until(self.path, progress.step)
        self.samples_per_step = samples_per_step
        self.device = device
        self.bar = tqdm(total=total, initial=progress.step, disable=not is_main(), dynamic_ncols=True)
        self.since = (time.perf_counter(), progress.step)

    def log(self, progress: Progress, losses: Dict[str, float], lrs: list) -> None:
        now, steps = time.perf_counter(), progress.step - self.since[1]
        line = {"step": progress.step, "epoch": progress.epoch, **losses, "lr": lrs,
                "samples_per_s": steps * self.samples_per_step / max(now - self.since[0], 1e-9), **peak_memory(self.device)}
        self.since = (now, progress.step)
        if is_main():
            with open(self.path, "a") as handle:
                handle.write(json_line(line))
            self.bar.set_postfix(loss=f"{losses['loss']:.4f}")

    def advance(self) -> None:
        """One step done (the bar)."""
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def extra_inputs(task: str, model, progress: Progress, steps_per_epoch: int, itc_bank: str = "local") -> dict:
    """Momentum-distilled tasks ramp alpha over epoch 0 (the authors' schedule) and take the config's itc_bank; others
    need nothing."""
    if task not in MOMENTUM_TASKS:
        return {}
    return {"alpha": ramped_alpha(progress.step_in_epoch, steps_per_epoch, progress.epoch, model.config.alpha),
            "itc_bank": itc_bank}


@dataclass
class Job:
    """Everything one training process runs with."""

    task: str
    cfg: dict
    output: Path
    info: DistInfo
    model: nn.Module
    step_module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    dataset: object
    loader: object
    sampler: object
    steps_per_epoch: int
    total_steps: int


def setup(args: argparse.Namespace, cfg: dict, info: DistInfo) -> Job:
    """Data, model (from --checkpoint), parallel wrapper, optimiser and schedule of a run."""
    from mplug.run.data import build_dataset, build_loader, load_tokenizer

    torch.manual_seed(cfg["seed"])
    dataset = build_dataset(args.task, "train", cfg, load_tokenizer(cfg["vocab"]), skip_bad_records=args.skip_bad_records)
    if is_main() and args.skip_bad_records and dataset.skipped:
        print(f"skipped {dataset.skipped} bad records, e.g. {dataset.skipped_reasons[:3]}", file=sys.stderr)
    loader, sampler = build_loader(dataset, cfg, train=True, rank=info.rank, world_size=info.world_size)
    if len(loader) == 0:
        raise ValueError(f"the training data has {len(dataset)} records, fewer than batch_size_train "
                         f"{cfg['batch_size_train']} x {info.world_size} processes: no full batch to train on")
    model = build_model(cfg, info.device, args.task).train()
    freeze_unused(model, args.task)
    if args.checkpoint and not args.resume:
        result = load_weights(model, args.checkpoint, None, partial=args.partial_load)
        if is_main():
            print(f"loaded {args.checkpoint}: {len(result.missing_keys)} keys left as initialised {result.missing_keys[:5]}, "
                  f"{len(result.unexpected_keys)} unexpected {result.unexpected_keys[:5]}, {len(result.ignored_keys)} "
                  f"dropped (not in this task's model) {result.ignored_keys[:5]}", file=sys.stderr)
    model.set_gradient_checkpointing(cfg["grad_checkpointing"])
    loss = ScstLoss(model, cfg, dataset.tokenizer) if cfg["scst"] else TaskLoss(model, args.task)
    step_module = parallel(loss, info.device, args.fsdp)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg["optimizer"]), betas=tuple(cfg["optimizer"]["betas"]))
    per_epoch = steps_per_epoch(len(loader), cfg["accumulate_steps"])
    if per_epoch == 0:
        raise ValueError(f"accumulate_steps {cfg['accumulate_steps']} is more than the {len(loader)} batches of an epoch")
    total = total_steps(cfg, per_epoch)
    scheduler = build_schedule(optimizer, cfg["schedule"], total, cfg["epochs"], per_epoch)
    return Job(args.task, cfg, Path(args.output), info, model, step_module, optimizer, scheduler,
               dataset, loader, sampler, per_epoch, total)


def save(job: Job, progress: Progress, steps=()) -> None:
    """checkpoint_last.pth (and checkpoint_step{N}.pth for N in steps) of the job as it stands (refused when its
    weights hold NaN or inf)."""
    check_finite_weights(job.model, progress.step)
    save_checkpoint(job.output, job.model, job.optimizer, job.scheduler, progress, job.cfg, steps)


def restore_run_rng(job: Job, resumed: dict) -> None:
    """The resumed run's RNG states, or a warning that a run of another number of processes starts them afresh."""
    if not restore_rng(resumed) and is_main():
        print(f"--resume: the checkpoint holds the RNG states of {len(resumed['rng'])} processes, this run has "
              f"{job.info.world_size}: random choices start afresh (seed {job.cfg['seed']} + rank)", file=sys.stderr)


def epoch_batches(job: Job, epoch: int, skip_batches: int) -> Iterator[dict]:
    """The loader's batches of ``epoch`` on this rank after its first skip_batches (each iter draws a worker seed from
    torch's RNG; the data do not depend on it)."""
    job.dataset.set_epoch(epoch)
    job.sampler.set_epoch(epoch)
    job.sampler.skip(skip_batches * job.cfg["batch_size_train"])
    return iter(job.loader)


def start_epoch(job: Job, progress: Progress, resumed: Optional[dict]):
    """The steps of progress.epoch from progress.step_in_epoch on, the first one opened by the previous epoch's carried
    batches (mplug.run.accumulate). A run resumed at an epoch's start restores its RNG states before the loaders draw
    their worker seeds, as the uninterrupted run drew them after its checkpoint; one resumed inside an epoch, after."""
    steps = job.cfg["accumulate_steps"]
    at_start = progress.step_in_epoch == 0
    if resumed is not None and at_start:
        restore_run_rng(job, resumed)
    carried = carried_batches(len(job.loader), steps, job.cfg["accumulate_last_group"])
    carried = carried if at_start and progress.epoch else 0
    tail = list(epoch_batches(job, progress.epoch - 1, len(job.loader) - carried)) if carried else []
    batches = group_batches(epoch_batches(job, progress.epoch, progress.step_in_epoch * steps), steps,
                            job.steps_per_epoch - progress.step_in_epoch, tail)
    if resumed is not None and not at_start:
        restore_run_rng(job, resumed)
    return batches


def run_epochs(job: Job, progress: Progress, resumed: Optional[dict]) -> None:
    """Epochs from ``progress`` to the end (or max_steps), logging and saving as the config says."""
    cfg = job.cfg
    parameters = [p for p in job.model.parameters() if p.requires_grad]
    logger = Logger(job.output, progress, job.total_steps, cfg["batch_size_train"] * cfg["accumulate_steps"] * job.info.world_size,
                    job.info.device)
    skipped, bad_images = 0, SkippedImages(job.dataset.skip_bad_records)
    try:
        while progress.epoch < cfg["epochs"] and progress.step < job.total_steps:
            for batch in start_epoch(job, progress, resumed):
                bad_images.add(batch)
                if bad_images.empty_on_any_rank(batch, job.info.device):  # no optimiser step; the counters advance
                    job.scheduler.step()
                    losses, finite = None, True
                else:
                    extra = extra_inputs(job.task, job.model, progress, job.steps_per_epoch, cfg["itc_bank"])
                    inputs = step_inputs(batch["inputs"], extra, job.info.device)
                    losses, finite = train_step(job.step_module, inputs, job.optimizer, job.scheduler, parameters,
                                                cfg["max_grad_norm"], job.info.device, cfg["accumulate_steps"])
                skipped = 0 if finite else skipped + 1
                progress.step += 1
                progress.step_in_epoch += 1
                logger.advance()
                if losses is not None and (progress.step % cfg["log_every"] == 0 or progress.step == job.total_steps):
                    logger.log(progress, mean_over_ranks(losses), job.scheduler.get_last_lr())
                if not finite:
                    check_skipped(skipped, cfg["skip_non_finite_steps"], progress.step, losses["loss"].item())
                if progress.step_in_epoch == job.steps_per_epoch:
                    progress.epoch, progress.step_in_epoch = progress.epoch + 1, 0
                numbered = (progress.step,) if cfg["save_every"] and progress.step % cfg["save_every"] == 0 else ()
                if numbered or progress.step_in_epoch == 0 or progress.step == job.total_steps:
                    save(job, progress, numbered)
                if progress.step >= job.total_steps:
                    break
            resumed = None
        reasons = bad_images.all_ranks()
        if is_main() and reasons:
            print(f"skipped {len(reasons)} bad records whose image could not be used, e.g. {reasons[:3]}", file=sys.stderr)
    finally:
        logger.close()


def train(args: argparse.Namespace, cfg: dict) -> Path:
    """The training run of parsed ``args`` with run config ``cfg`` -> the path of its last checkpoint."""
    info = init_distributed()
    resumed = read_checkpoint(args.resume) if args.resume else None
    if resumed is not None:
        resumed["config"].setdefault("accumulate_last_group", "drop")  # what runs from before the key did
        check_same_run(resumed["config"], cfg, args.resume)
        check_same_world_size(resumed, info.world_size, args.resume)
    lock = open_run_output(args.output, args.resume, args.overwrite) if is_main() else None
    try:
        job = setup(args, cfg, info)
        progress = restore(resumed, job.model, job.optimizer, job.scheduler) if resumed is not None else Progress()
        torch.manual_seed(cfg["seed"] + info.rank)
        run_epochs(job, progress, resumed)
    finally:
        if lock is not None:
            lock.release()
    return job.output / LAST


def main(argv: Optional[Sequence[str]] = None) -> Path:
    """Parse the command line, load the config, train; the process group is left at the end."""
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if cfg["task"] != args.task:
        raise ValueError(f"--task {args.task} but config {args.config!r} is for task {cfg['task']!r}")
    if args.fsdp and args.task in MOMENTUM_TASKS:
        raise ValueError(
            f"--fsdp does not support --task {args.task}: its momentum copies take their EMA step in place inside the "
            "forward, where FSDP2 holds the top-level parameters unsharded, so the step would be lost; use DDP (no --fsdp)"
        )
    try:
        last = train(args, cfg)
    except BaseException:
        close_distributed(wait=False)
        raise
    close_distributed()
    return last


if __name__ == "__main__":
    main()
