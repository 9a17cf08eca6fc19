"""Video test sets of mplug.run.evaluate in the authors' annotation formats (AliceMind mPLUG/dataset/):

- videoqa (MSRVTT-QA, videoqa_dataset.py): JSON lines {"video_id", "question", "answer"}; question_id = the record's
  index over the test files (their :60-61); the answer list (config answer_list) is a JSON object whose keys are the
  answers (their train_ans2label.json, read as ``list(json.load(..).keys())``) or a JSON list.
- video_caption (VATEX, video_dataset.py vatex_video_caps_dataset): a JSON list of {"videoID", "enCap": [..]}.
- video_retrieval (MSR-VTT, video_dataset.py VideoDataset): JSON lines {"clip_name", "caption"}, text i of video i
  (a "caption" list gives a video several texts), cleaned as their pre_caption (max_words).
A file whose first character is "[" is read as a JSON list, any other as JSON lines. Videos are image_root/<id>.mp4
(their video_fmt; .avi, MSVD's, where no .mp4 exists), num_frames frames (null = the authors' count:
mplug.run.data.video.AUTHORS_NUM_FRAMES) sampled as theirs, image_size square. A batch's videos are padded to its
longest frame count with ``frame_mask``.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List

import torch
from torch.utils.data import Dataset

from mplug.run.data.bad_images import bad_item, split_items
from mplug.run.data.prompt import generation_prompt_ids, training_prompt
from mplug.run.data.records import (BadRecord, BadRecords, annotation_files, cleaned, config_path, field, load_json,
                                    load_json_list, text_field, texts_field)
from mplug.run.data.text import check_vocabulary
from mplug.run.data.video import AUTHORS_NUM_FRAMES, import_av, load_video
from mplug.run.run_config import build_model_config

VIDEO_TASKS = ("videoqa", "video_caption", "video_retrieval")
# The image task whose model (and checkpoint) each video task runs: the authors evaluate video QA with their VQA
# checkpoint (videoqa_msrvtt_mplug_base.sh), VATEX with the caption model, MSR-VTT with the retrieval model.
MODEL_TASKS = {"videoqa": "vqa", "video_caption": "caption", "video_retrieval": "retrieval"}
NUM_FRAMES = {"videoqa": AUTHORS_NUM_FRAMES["videoqa"], "video_caption": AUTHORS_NUM_FRAMES["videocaption"],
              "video_retrieval": AUTHORS_NUM_FRAMES["videoretrieval"]}
VIDEO_EXTENSIONS = (".mp4", ".avi")


def read_annotations(path: str) -> list:
    """The records of a JSON-list or JSON-lines file (ValueError naming the file and line)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: annotation file does not exist")
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    if text.lstrip().startswith("["):
        return load_json_list(path)
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {number} is not JSON ({error})") from None
    return records


def video_file(root: str, video_id: str) -> str:
    """root/<video_id>.mp4 (or .avi), which must exist (else BadRecord)."""
    for extension in VIDEO_EXTENSIONS:
        path = os.path.join(root, video_id + extension)
        if os.path.isfile(path):
            return path
    raise BadRecord(f"video {os.path.join(root, video_id)}{{{','.join(VIDEO_EXTENSIONS)}}} does not exist")


def _parse(task: str, record: dict, root: str, number: int, max_words: int) -> dict:
    if task == "videoqa":
        return {"video": video_file(root, text_field(record, "video_id")), "question": text_field(record, "question"),
                "question_id": number, "answer": field(record, "answer", str, "a string")}
    if task == "video_caption":
        video_id = text_field(record, "videoID")
        return {"video": video_file(root, video_id), "video_id": video_id, "references": texts_field(record, "enCap", False)}
    captions = texts_field(record, "caption", True)
    return {"video": video_file(root, text_field(record, "clip_name")),
            "captions": [cleaned(caption, max_words, "caption") for caption in captions]}


def read_video_samples(task: str, cfg: dict, bad: BadRecords) -> List[dict]:
    """Every good test sample of a video task, each with "source" = (file, record index)."""
    root = config_path(cfg, "image_root", task, "test")
    samples, number = [], 0
    for file in annotation_files(cfg, "test_file", task, "test"):
        for index, record in enumerate(read_annotations(file)):
            try:
                if not isinstance(record, dict):
                    raise BadRecord(f"must be a JSON object, got {type(record).__name__}")
                samples.append({**_parse(task, record, root, number, cfg["max_words"]), "source": (file, index)})
            except BadRecord as error:
                bad.report(file, index, str(error))
            number += 1
    return samples


def video_answer_list(cfg: dict) -> List[str]:
    """The answer list of video QA: the keys of a JSON object (their ans2label file) or a JSON list of strings."""
    path = config_path(cfg, "answer_list", "videoqa", "test")
    value = load_json(path, "answer list")
    answers = list(value) if isinstance(value, (dict, list)) else None
    if not answers or not all(isinstance(answer, str) and answer.strip() for answer in answers):
        raise ValueError(f"{path}: the answer list must be a JSON object (answer -> label) or list of non-empty strings")
    return answers


class VideoTestDataset(Dataset):
    """The test videos of one video task; collate gives the model method's inputs and the ids (module docstring)."""

    def __init__(self, task: str, cfg: dict, tokenizer, skip_bad_records: bool = False):
        if task not in VIDEO_TASKS:
            raise ValueError(f"task must be one of {VIDEO_TASKS}, got {task!r}")
        check_vocabulary(tokenizer, build_model_config(cfg))
        bad = BadRecords(skip_bad_records)
        self.task, self.tokenizer, self.skip_bad_records = task, tokenizer, skip_bad_records
        self.image_size, self.max_tokens = cfg["image_size"], cfg["max_tokens"]
        self.num_frames = cfg["num_frames"] or NUM_FRAMES[task]
        self.samples = read_video_samples(task, cfg, bad)
        self.skipped, self.skipped_reasons = len(bad.reasons), bad.reasons
        if not self.samples:
            raise ValueError(f"the {task} test data has no usable records ({self.skipped} skipped)")
        if task == "videoqa":
            self.answer_list = video_answer_list(cfg)
        prompt = generation_prompt_ids(tokenizer, training_prompt(cfg["prompt"]), cfg["prompt_mode"])
        self.generation_ids = [tokenizer.cls_token_id, *prompt] if task == "video_caption" and prompt else None
        self.texts = [text for sample in self.samples for text in sample.get("captions", [])]
        self.txt2img = [number for number, sample in enumerate(self.samples) for _ in sample.get("captions", [])]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Dict:
        sample = self.samples[index]
        try:
            frames = load_video(sample["video"], self.num_frames, self.image_size)
        except (OSError, ValueError, import_av().error.FFmpegError) as error:
            file, record = sample["source"]
            reason = f"{file}: record {record}: cannot read video {sample['video']} ({error})"
            if not self.skip_bad_records:
                raise ValueError(reason) from None
            return bad_item(index, reason)
        return {**sample, "frames": frames, "index": index}

    def tokens(self, texts: List[str]):
        """Texts -> ("[CLS] .. [SEP]" ids long [N, L], bool mask [N, L]), right-padded, <= max_tokens."""
        encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"].bool()

    def collate(self, items: List[Dict]) -> Dict:
        """Items -> {"inputs", "meta", "dropped"} (inputs and meta None when every item's video was bad)."""
        items, dropped = split_items(items)
        if not items:
            return {"inputs": None, "meta": None, "dropped": dropped}
        longest = max(item["frames"].shape[0] for item in items)
        frames = torch.zeros(len(items), longest, *items[0]["frames"].shape[1:])
        frame_mask = torch.zeros(len(items), longest, dtype=torch.bool)
        for row, item in enumerate(items):
            frames[row, : item["frames"].shape[0]] = item["frames"]
            frame_mask[row, : item["frames"].shape[0]] = True
        inputs, meta = {"frames": frames, "frame_mask": frame_mask}, {"index": [item["index"] for item in items]}
        if self.task == "videoqa":
            inputs["question_ids"], inputs["question_mask"] = self.tokens([item["question"] for item in items])
            meta.update(question_id=[item["question_id"] for item in items], label=[item["answer"] for item in items])
        elif self.task == "video_caption":
            if self.generation_ids:
                inputs["prompt_ids"] = torch.tensor([self.generation_ids] * len(items), dtype=torch.long)
            meta.update(video_id=[item["video_id"] for item in items], references=[item["references"] for item in items])
        return {"inputs": inputs, "meta": meta, "dropped": dropped}
