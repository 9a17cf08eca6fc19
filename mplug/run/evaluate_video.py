"""The video tasks of ``python -m mplug.run.evaluate`` (the authors' zero-shot video transfer, AliceMind mPLUG/):

- ``--task videoqa`` (videoqa_mplug.py:45-70): each question ranks the answer list (rank_answer, k = k_test, 128 in
  their config) over the fused [video; question]; writes ``videoqa_result.json`` = [{"question_id", "answer"}] and
  the accuracy, the fraction of answers equal to the record's "answer" (their cal_metric, :82-101).
- ``--task video_caption`` (videocap_mplug.py:44-59, VATEX): beam search from "[CLS] " + the config prompt ("a
  picture of"), the caption stripped with " ." appended; writes ``video_caption_result.json`` = [{"video_id",
  "caption"}] and the COCO caption metrics against the records' enCap (mplug.run.caption_eval).
- ``--task video_retrieval`` (retrieval_vid_mplug.py:97,117, MSR-VTT): ITC similarities, each query's k_test best
  re-ranked by ITM + ITC; recall@1/5/10 both ways (mplug.run.metrics.retrieval_recall). Every rank scores the whole
  set (the frames of every video at once, as MPLUG.video_retrieval_scores takes them); rank 0 writes.
Each runs the model of its image task (data.video_dataset.MODEL_TASKS); the data formats are data.video_dataset's.
"""
from __future__ import annotations

from typing import List

import torch

from mplug.run import caption_eval, metrics
from mplug.run.data.bad_images import with_placeholders, without_placeholders
from mplug.run.data.loader import build_loader
from mplug.run.evaluate_rows import decode, gather_in_dataset_order, meta_rows, progress, unique
from mplug.run.run_config import CONFIG_DIR
from mplug.run.runtime import autocast, is_main, to_device
from mplug.tasks.video import answer_list_inputs, vatex_caption

# Shipped video configs, found by name (their task key is the image task they run, so they sit outside SHIPPED).
VIDEO_CONFIGS = ("videoqa_base", "video_caption_large", "video_retrieval_large")


def config_source(name_or_path: str) -> str:
    """A shipped video config name -> its file; anything else unchanged (for run_config.load_config)."""
    return str(CONFIG_DIR / f"{name_or_path}.yaml") if name_or_path in VIDEO_CONFIGS else name_or_path


def _answers(model, inputs, answer_inputs, dataset, cfg) -> List[str]:
    answer_ids, answer_mask = answer_inputs
    ranked = model.video_qa_rank(**inputs, answer_ids=answer_ids, answer_mask=answer_mask, k=cfg["k_test"])
    return [dataset.answer_list[index] for index in ranked.ids[:, 0].tolist()]


def _captions(model, inputs, tokenizer, cfg) -> List[str]:
    output = model.video_caption_generate(**inputs, num_beams=cfg["num_beams"], min_length=cfg["min_length"],
                                          max_length=cfg["max_length"])
    return [vatex_caption(text) for text in decode(tokenizer, output.sequences[:, 0], model.config.eos_token_id)]


def generated_rows(task: str, model, loader, dataset, cfg: dict, tokenizer, device) -> List[dict]:
    """This rank's rows in its sampler's order: the batch meta plus "answer" (videoqa) or "caption" (video_caption);
    {"skipped": reason} for a record whose video could not be read (--skip-bad-records)."""
    answer_inputs = tuple(tensor.to(device) for tensor in answer_list_inputs(tokenizer, dataset.answer_list)) \
        if task == "videoqa" else None
    field = "answer" if task == "videoqa" else "caption"
    rows = []
    for batch in progress(loader, f"evaluate {task}"):
        texts = []
        if batch["inputs"] is not None:
            inputs = to_device(batch["inputs"], device)
            with autocast(device):
                texts = (_answers(model, inputs, answer_inputs, dataset, cfg) if task == "videoqa"
                         else _captions(model, inputs, tokenizer, cfg))
        rows += with_placeholders([{**meta, field: text} for meta, text in
                                   zip(meta_rows(batch["meta"] or {}, len(texts)), texts)], batch)
    return rows


def videoqa_outputs(rows: List[dict]):
    """(videoqa_result.json entries, metrics): accuracy = fraction of answers equal to the record's answer."""
    unique(rows, "question_id")
    results = [{"question_id": row["question_id"], "answer": row["answer"]} for row in rows]
    correct = sum(row["answer"] == row["label"] for row in rows)
    return results, {"questions": len(rows), "accuracy": correct / len(rows)}


def video_caption_outputs(rows: List[dict]):
    """(video_caption_result.json entries, metrics): the COCO caption metrics against enCap, or why they could not run."""
    unique(rows, "video_id")
    results = [{"video_id": row["video_id"], "caption": row["caption"]} for row in rows]
    reason = caption_eval.unavailable_reason()
    if reason is not None:
        return results, {"videos": len(rows), "caption_metrics_skipped": reason}
    scores = caption_eval.coco_caption_scores([row["caption"] for row in rows], [row["references"] for row in rows])
    return results, {"videos": len(rows), **scores}


def _all_videos(dataset, cfg: dict):
    """(frames [N, T, 3, S, S], frame_mask [N, T], the usable video indices, the dropped items) of the whole set."""
    loader, _ = build_loader(dataset, cfg, train=False, rank=0, world_size=1)
    videos, order, dropped = [], [], []
    for batch in progress(loader, "read retrieval videos"):
        dropped += batch["dropped"]
        if batch["inputs"] is not None:
            videos += list(zip(batch["inputs"]["frames"], batch["inputs"]["frame_mask"]))
            order += batch["meta"]["index"]
    if not order:
        raise ValueError(f"no video_retrieval test video could be used ({len(dropped)} skipped)")
    longest = max(int(mask.sum()) for _, mask in videos)
    frames = torch.zeros(len(videos), longest, *videos[0][0].shape[1:])
    frame_mask = torch.zeros(len(videos), longest, dtype=torch.bool)
    for row, (video, mask) in enumerate(videos):
        count = int(mask.sum())
        frames[row, :count], frame_mask[row, :count] = video[:count], True
    return frames, frame_mask, order, dropped


def video_retrieval_outputs(model, dataset, cfg: dict, device):
    """(recall@1/5/10 both ways over the usable videos and their texts, the reasons of the videos skipped)."""
    frames, frame_mask, order, dropped = _all_videos(dataset, cfg)
    texts = [text for video in order for text in dataset.samples[video]["captions"]]
    txt2img = [number for number, video in enumerate(order) for _ in dataset.samples[video]["captions"]]
    text_ids, text_mask = dataset.tokens(texts)
    with autocast(device):
        scores = model.video_retrieval_scores(frames.to(device), text_ids.to(device), text_mask.to(device),
                                              frame_mask.to(device), k=cfg["k_test"], batch_size=cfg["batch_size_test"])
    recall = metrics.retrieval_recall(scores.i2t.float().cpu(), scores.t2i.float().cpu(), txt2img)
    return {"videos": len(order), "texts": len(texts), **recall}, [drop["reason"] for drop in dropped]


OUTPUTS = {"videoqa": videoqa_outputs, "video_caption": video_caption_outputs}


def video_outputs(task: str, model, dataset, cfg: dict, tokenizer, info):
    """(result entries or None, metrics, reasons of the skipped records) of a video task; the first two are None
    off rank 0 for videoqa / video_caption."""
    if task == "video_retrieval":
        scores, bad = video_retrieval_outputs(model, dataset, cfg, info.device)
        return None, scores, bad
    loader, _ = build_loader(dataset, cfg, train=False, rank=info.rank, world_size=info.world_size)
    own = generated_rows(task, model, loader, dataset, cfg, tokenizer, info.device)
    rows = gather_in_dataset_order(own, len(dataset), info.world_size)
    if not is_main():
        return None, None, []
    rows, bad = without_placeholders(rows)
    if not rows:
        raise ValueError(f"no {task} test record could be used ({len(bad)} skipped: {bad[:3]})")
    return (*OUTPUTS[task](rows), bad)
