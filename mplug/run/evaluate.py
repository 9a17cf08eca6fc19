"""``python -m mplug.run.evaluate --task {vqa,caption,retrieval,ve,nlvr,grounding,videoqa,video_caption,video_retrieval}
--config NAME_OR_FILE [--set key=value ...] --checkpoint FILE --output DIR [--skip-bad-records]``, one process or under
torchrun (gloo on the CPU).

VQA writes ``<output>/vqa_result.json`` = [{"question_id", "answer"}] (answers by free beam search: the model's
vqa_generate takes no answer list to rank) and, where the test records carry answers, the VQA accuracy; caption
writes ``<output>/caption_result.json`` = [{"image_id", "caption"}] with BLEU-1..4, METEOR, ROUGE-L and CIDEr-D
(pycocoevalcap, mplug.run.caption_eval), per nocaps domain when the test_file is a nocaps file (mplug.run.evaluate_nocaps);
retrieval writes
recall@1/5/10 both ways; ve / nlvr write ``<output>/{ve,nlvr}_result.json`` = [{"file", "record", "prediction",
"label"}] (ve labels by name, nlvr 0 = false / 1 = true) and the accuracy (fraction correct); grounding writes
``<output>/grounding_result.json`` = [{"file", "record", "box", "target"}] (normalised cx, cy, w, h) and the accuracy
at IoU >= 0.5 (mplug.tasks.grounding.grounding_accuracy). Scores go to ``<output>/metrics.json``. Each rank generates for
its share of the test set;
rank 0 gathers the outputs back into the data set's order (the sampler's padding dropped), scores them and writes
every file at the end, each through a temporary file and os.replace, so a run that fails writes nothing.
Retrieval: every rank embeds the whole test set and re-ranks its slice of the queries, the score matrices combined
over ranks as the authors' retrieval_img_mplug.py (mplug.run.retrieval_shards).
Video (mplug.run.evaluate_video, configs videoqa_base / video_caption_large / video_retrieval_large): videoqa ranks the
answer list and writes videoqa_result.json and the accuracy; video_caption (VATEX) writes video_caption_result.json and
the caption metrics; video_retrieval writes recall@1/5/10 both ways.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from mplug.run import caption_eval, evaluate_nocaps, evaluate_video, metrics
from mplug.run.data.bad_images import with_placeholders, without_placeholders
from mplug.run.evaluate_rows import plain_values, decode, gather_in_dataset_order, meta_rows, progress, unique
from mplug.run.data.video_dataset import MODEL_TASKS, VIDEO_TASKS
from mplug.run.retrieval_shards import sharded_retrieval_scores
from mplug.run.output import check_result_output, finite_or_text
from mplug.run.run_config import load_config, run_arguments
from mplug.tasks.classification import VE_LABELS
from mplug.tasks.grounding import grounding_accuracy
from mplug.run.runtime import (
    atomic_write, autocast, barrier, build_model, close_distributed, init_distributed, is_main,
    is_training_checkpoint, load_weights, to_device,
)

TASKS = ("vqa", "caption", "retrieval", "ve", "nlvr", "grounding", *VIDEO_TASKS)
RESULT_FILES = {"vqa": "vqa_result.json", "caption": "caption_result.json", "ve": "ve_result.json",
                "nlvr": "nlvr_result.json", "grounding": "grounding_result.json", "videoqa": "videoqa_result.json",
                "video_caption": "video_caption_result.json"}
GENERATED_FIELD = {"vqa": "answer", "caption": "caption"}
PREDICT_METHODS = {"ve": "ve_predict", "nlvr": "nlvr_predict", "grounding": "ground"}
METRICS_FILE = "metrics.json"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """The command line of ``python -m mplug.run.evaluate``."""
    parser = argparse.ArgumentParser(prog="python -m mplug.run.evaluate", description=__doc__.split("\n\n")[1],
                                     parents=[run_arguments(TASKS, "folder for the result JSON and metrics.json")])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint of mplug.run.train or the authors' .pth")
    return parser.parse_args(argv)


def checkpoint_task(path) -> Optional[str]:
    """The task a mplug.run.train checkpoint was trained for, read without loading its tensors (None for the authors'
    files, which name no task, and for files torch.load cannot map)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # load_weights reports unreadable files with their cause
        return None
    return state.get("config", {}).get("task") if is_training_checkpoint(state) else None


def check_task(task: str, cfg: dict, checkpoint) -> None:
    """--task must be an evaluation task, agree with the config's task and with a training checkpoint's task (a video
    task's: the image task it runs, MODEL_TASKS)."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    if not os.path.isfile(checkpoint):
        raise ValueError(f"--checkpoint {os.fspath(checkpoint)!r} is not a file")
    expected = MODEL_TASKS.get(task, task)
    named = f"--task {task!r}" + (f" (model task {expected!r})" if expected != task else "")
    for source, other in (("the config", cfg.get("task")), (f"checkpoint {os.fspath(checkpoint)!r}", checkpoint_task(checkpoint))):
        if other is not None and other != expected:
            raise ValueError(f"{named} does not match {source}, which is for task {other!r}")


def write_json_atomic(path: Path, value) -> None:
    """Write ``value`` as strict JSON (non-finite floats as text) to ``path`` (its folder created) through
    mplug.run.runtime.atomic_write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda stream: json.dump(finite_or_text(value), stream, indent=1, allow_nan=False), binary=False)


def generate(model, loader, task: str, cfg: dict, tokenizer, device: torch.device) -> List[dict]:
    """This rank's generated text per sample in its sampler's order: the batch meta plus "answer" (vqa) or
    "caption" (caption), by beam search with the config's num_beams / min_length / max_length; {"skipped": reason}
    for a record whose image could not be used (--skip-bad-records)."""
    method = model.vqa_generate if task == "vqa" else model.caption_generate
    settings = dict(num_beams=cfg["num_beams"], min_length=cfg["min_length"], max_length=cfg["max_length"])
    rows = []
    for batch in progress(loader, f"evaluate {task}"):
        texts = []
        if batch["inputs"] is not None:
            with autocast(device):
                output = method(**to_device(batch["inputs"], device), **settings)
            texts = decode(tokenizer, output.sequences[:, 0], model.config.eos_token_id)
        rows += with_placeholders([{**meta, GENERATED_FIELD[task]: text}
                                   for meta, text in zip(meta_rows(batch["meta"] or {}, len(texts)), texts)], batch)
    return rows


def predict(model, loader, task: str, device: torch.device) -> List[dict]:
    """This rank's prediction per sample of a ve / nlvr / grounding test loader in its sampler's order: the batch meta
    plus "prediction" (a class index, or a normalised cx, cy, w, h box for grounding); {"skipped": reason} for a
    record whose image could not be used (--skip-bad-records)."""
    method = getattr(model, PREDICT_METHODS[task])
    rows = []
    for batch in progress(loader, f"evaluate {task}"):
        predictions = []
        if batch["inputs"] is not None:
            with autocast(device):
                predictions = method(**to_device(batch["inputs"], device)).float().cpu().tolist()
        rows += with_placeholders([{**meta, "prediction": prediction}
                                   for meta, prediction in zip(meta_rows(batch["meta"] or {}, len(predictions)), predictions)], batch)
    return rows


def vqa_outputs(rows: List[dict]):
    """(vqa_result.json entries, metrics): accuracy in percent over the questions whose records carry answers."""
    unique(rows, "question_id")
    results = [{"question_id": row["question_id"], "answer": row["answer"]} for row in rows]
    scored = {row["question_id"]: row["answers"] for row in rows if row.get("answers")}
    scores = {"questions": len(rows), "scored_questions": len(scored)}
    if scored:
        scores["vqa_accuracy"] = metrics.vqa_accuracy({row["question_id"]: row["answer"] for row in rows}, scored)
    return results, scores


def caption_outputs(rows: List[dict]):
    """(caption_result.json entries, metrics): the COCO caption metrics (mplug.run.caption_eval) against the records'
    reference sentences, or the reason they could not run (no java / pycocoevalcap)."""
    unique(rows, "image_id")
    results = [{"image_id": row["image_id"], "caption": row["caption"]} for row in rows]
    captions, references = [row["caption"] for row in rows], [row["references"] for row in rows]
    reason = caption_eval.unavailable_reason()
    if reason is not None:
        return results, {"images": len(rows), "caption_metrics_skipped": reason}
    return results, {"images": len(rows), **caption_eval.coco_caption_scores(captions, references)}


def classification_outputs(task: str, rows: List[dict]):
    """(ve / nlvr result entries, metrics): the accuracy (fraction of records whose prediction is their label)."""
    name = (lambda index: VE_LABELS[int(index)]) if task == "ve" else int
    results = [{"file": row["file"], "record": row["record"], "prediction": name(row["prediction"]), "label": name(row["label"])}
               for row in rows]
    correct = sum(result["prediction"] == result["label"] for result in results)
    return results, {"records": len(rows), "accuracy": correct / len(rows)}


def grounding_outputs(rows: List[dict]):
    """(grounding result entries, metrics): the accuracy at IoU >= 0.5 of the predicted against the target boxes."""
    results = [{"file": row["file"], "record": row["record"], "box": row["prediction"], "target": row["box"]} for row in rows]
    boxes = torch.tensor([row["prediction"] for row in rows], dtype=torch.float64)
    targets = torch.tensor([row["box"] for row in rows], dtype=torch.float64)
    return results, {"records": len(rows), "accuracy_iou_0.5": grounding_accuracy(boxes, targets)}


OUTPUTS = {"vqa": vqa_outputs, "caption": caption_outputs, "grounding": grounding_outputs,
           "ve": partial(classification_outputs, "ve"), "nlvr": partial(classification_outputs, "nlvr")}


def retrieval_outputs(model, dataset, cfg: dict, device: torch.device):
    """(recall@1/5/10 both ways over the whole test set: every usable image (in order) against its texts, the
    reasons of the images skipped with their texts (--skip-bad-records)) (call on every rank: each re-ranks its share)."""
    from mplug.run.data import build_loader

    loader, _ = build_loader(dataset, cfg, train=False, rank=0, world_size=1)
    images, order, dropped = [], [], []
    for batch in progress(loader, "read retrieval images"):
        dropped += batch["dropped"]
        if batch["inputs"] is not None:
            images.append(batch["inputs"]["images"])
            order += plain_values(batch["meta"]["image_index"])
    if order != sorted(order) or sorted(order + [drop["index"] for drop in dropped]) != list(range(len(dataset))):
        raise RuntimeError(f"the retrieval test loader gave images {order[:8]}.. instead of 0..{len(dataset) - 1} in order")
    if not order:
        raise ValueError(f"no retrieval test image could be used ({len(dropped)} skipped)")
    texts, txt2img = dataset.text_inputs(), dataset.txt2img
    if dropped:  # the skipped images' texts go too
        kept = [text for image in order for text in dataset.img2txt[image]]
        texts = dict(zip(("text_ids", "text_mask"), dataset.tokens([dataset.texts[text] for text in kept])))
        txt2img = [number for number, image in enumerate(order) for _ in dataset.img2txt[image]]
    with autocast(device):
        scores = sharded_retrieval_scores(model, torch.cat(images).to(device), **to_device(texts, device), k=cfg["k_test"],
                                        batch_size=cfg["batch_size_test"])
    recall = metrics.retrieval_recall(scores.i2t.float().cpu(), scores.t2i.float().cpu(), txt2img)
    return {"images": len(order), "texts": len(txt2img), **recall}, [drop["reason"] for drop in dropped]


def evaluate(task: str, cfg: dict, checkpoint, output, skip_bad_records: bool = False, overwrite: bool = False,
             partial_load: bool = False) -> Optional[dict]:
    """Run the evaluation of ``task`` (see the module docstring) in this process of the job; returns the metrics on
    rank 0 (None elsewhere) after the files are written. --output is checked (and created) first: result files
    already there are refused unless ``overwrite``."""
    from mplug.run.data import build_dataset, build_loader, load_tokenizer
    from mplug.run.data.video_dataset import VideoTestDataset

    check_task(task, cfg, checkpoint)
    info = init_distributed()
    tokenizer = load_tokenizer(cfg["vocab"])
    dataset = (VideoTestDataset(task, cfg, tokenizer, skip_bad_records) if task in VIDEO_TASKS
               else build_dataset(task, "test", cfg, tokenizer, skip_bad_records=skip_bad_records))
    model = build_model(cfg, info.device, MODEL_TASKS.get(task, task))
    load_weights(model, checkpoint, MODEL_TASKS.get(task, task), partial=partial_load)
    model.eval()
    if is_main():  # before the generation; after the checkpoint, so a bad one leaves no folder behind
        check_result_output(output, [name for name in (RESULT_FILES.get(task), METRICS_FILE) if name], overwrite)
    results, scores, bad_images = None, None, []
    if task in VIDEO_TASKS:
        results, scores, bad_images = evaluate_video.video_outputs(task, model, dataset, cfg, tokenizer, info)
    elif task == "retrieval":
        scores, bad_images = retrieval_outputs(model, dataset, cfg, info.device)
    else:
        loader, sampler = build_loader(dataset, cfg, train=False, rank=info.rank, world_size=info.world_size)
        if getattr(sampler, "shuffle", False):
            raise ValueError("the test loader's sampler shuffles; evaluation needs the data set's order")
        own = (predict(model, loader, task, info.device) if task in PREDICT_METHODS
               else generate(model, loader, task, cfg, tokenizer, info.device))
        rows = gather_in_dataset_order(own, len(dataset), info.world_size)
        if is_main():
            rows, bad_images = without_placeholders(rows)
            if not rows:
                raise ValueError(f"no {task} test record could be used ({len(bad_images)} skipped: {bad_images[:3]})")
            results, scores = (evaluate_nocaps.nocaps_outputs(rows, dataset.samples) if evaluate_nocaps.is_nocaps(dataset)
                               else OUTPUTS[task](rows))
    if is_main():
        if bad_images:
            medium = "video" if task in VIDEO_TASKS else "image"
            print(f"skipped {len(bad_images)} bad records whose {medium} could not be used, e.g. {bad_images[:3]}", file=sys.stderr)
        skipped = getattr(dataset, "skipped", 0) + len(bad_images)
        scores = {"task": task, "checkpoint": os.fspath(checkpoint), "skipped_records": skipped, **scores}
        if results is not None:
            write_json_atomic(Path(output) / RESULT_FILES[task], results)
        write_json_atomic(Path(output) / METRICS_FILE, scores)
    barrier()
    return scores


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    """Entry point of ``python -m mplug.run.evaluate``: parse, evaluate, print the metrics on rank 0."""

    args = parse_args(argv)
    cfg = load_config(evaluate_video.config_source(args.config), args.overrides)
    scores = evaluate(args.task, cfg, args.checkpoint, args.output, args.skip_bad_records, args.overwrite, args.partial_load)
    close_distributed()
    if scores is not None:
        print(json.dumps(scores, indent=1), file=sys.stdout)
    return scores


if __name__ == "__main__":
    main()
