"""Readers of the authors' annotation JSON (a list of records per file), checked record by record.

Formats: VQA train {"image", "question", "answer": [..] or "..", "dataset": "vqa"|"vg"|"gqa"}, VQA test {"image",
"question", "question_id"} (+ "answer" when known) and the answer-list JSON; caption (Karpathy COCO) {"filename",
"filepath", "sentences": [{"raw"}, ..]}; retrieval train {"image", "caption", "image_id"}, test {"image", "caption":
[..]}; pretraining {"image", "caption": ".." or [..]}; SNLI-VE {"image" (".jpg" appended when only that file exists), "sentence", "label": "entailment" |
"neutral" | "contradiction"}; NLVR2 {"images": [left, right], "sentence", "label": "True" | "False" or a bool};
grounding (RefCOCO style) {"image", "text" (or "sentence"), "bbox": [x, y, w, h] in pixels}. A bad record (a missing key, a wrong type, an empty answer
list, a missing image file) raises ValueError("<file>: record <i>: <what>"), or with skip_bad_records is dropped and
its message kept in BadRecords.reasons.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable, Dict, List

from PIL import Image

from mplug.tasks.classification import VE_LABELS
from mplug.run.data.text import clean_answer, clean_text
from mplug.run.data.vqa_inputs import authors_question
from mplug.tasks.finetune import vqa_answer_weights

VQA_ROOTS = {"vqa": "vqa_root", "vg": "vg_root", "gqa": "gqa_root"}


class BadRecord(Exception):
    """What is wrong with one record (the reader adds the file and the record index)."""


class BadRecords:
    """Reports bad records: raises ValueError at the first one, or, when skipping, counts them and keeps the messages."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.reasons: List[str] = []

    def report(self, file, index: int, what: str) -> None:
        message = f"{file}: record {index}: {what}"
        if not self.skip:
            raise ValueError(message)
        self.reasons.append(message)


def config_path(cfg: dict, key: str, task: str, split: str):
    """cfg[key], which the task's split needs: a ValueError naming the key when it is not set."""
    value = cfg.get(key)
    if value is None:
        raise ValueError(f"config key {key!r} is not set but the {task} {split} data needs it: pass --set {key}=PATH")
    return value


def annotation_files(cfg: dict, key: str, task: str, split: str) -> List[str]:
    """cfg[key] (one path or a list) as a list of paths."""
    value = config_path(cfg, key, task, split)
    files = [value] if isinstance(value, str) else value
    if not isinstance(files, list) or not files or not all(isinstance(f, str) for f in files):
        raise ValueError(f"config key {key!r} must be a path or a non-empty list of paths, got {value!r}")
    return files


def load_json(path: str, what: str = "annotation file"):
    """The JSON value in path (ValueError naming the file when it is missing, not JSON, or nested too deeply)."""
    if not os.path.isfile(path):
        raise ValueError(f"{path}: {what} does not exist")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: {what} is not valid JSON ({error})") from None
    except RecursionError:
        raise ValueError(f"{path}: {what} nests its JSON too deeply to read (no annotation file nests that deep)") from None


def load_json_list(path: str, what: str = "annotation file") -> list:
    """The JSON list in path (ValueError naming the file when it is missing, not JSON, or not a list)."""
    records = load_json(path, what)
    if not isinstance(records, list):
        raise ValueError(f"{path}: {what} must hold a JSON list of records, got a {type(records).__name__}")
    return records


def read_records(files: List[str], parse: Callable[[dict], List[dict]], bad: BadRecords) -> List[dict]:
    """parse(record) of every record of the files (each parse returns samples, or raises BadRecord); each sample
    gets "source" = (file, record index)."""
    samples = []
    for file in files:
        for index, record in enumerate(load_json_list(file)):
            try:
                if not isinstance(record, dict):
                    raise BadRecord(f"must be a JSON object, got {type(record).__name__}")
                parsed = parse(record)
            except BadRecord as error:
                bad.report(file, index, str(error))
                continue
            samples += [{**sample, "source": (file, index)} for sample in parsed]
    return samples


def field(record: dict, key: str, kinds, what: str):
    """record[key], which must be of kinds (a type or tuple of types), else BadRecord."""
    if key not in record:
        raise BadRecord(f"missing key {key!r} ({what})")
    value = record[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise BadRecord(f"key {key!r} must be {what}, got {type(value).__name__} {value!r:.60}")
    return value


def text_field(record: dict, key: str) -> str:
    """A non-empty string."""
    value = field(record, key, str, "a non-empty string")
    if not value.strip():
        raise BadRecord(f"key {key!r} is an empty string")
    return value


def texts_field(record: dict, key: str, allow_single: bool) -> List[str]:
    """A non-empty list of non-empty strings (or, when allow_single, one string)."""
    value = field(record, key, (str, list) if allow_single else list, "a non-empty list of strings")
    texts = [value] if isinstance(value, str) else value
    if not texts:
        raise BadRecord(f"key {key!r} is an empty list")
    if not all(isinstance(text, str) and text.strip() for text in texts):
        raise BadRecord(f"key {key!r} must hold only non-empty strings, got {texts!r:.80}")
    return texts


def cleaned(text: str, max_words: int, key: str) -> str:
    """clean_text(text), which must keep a word (else BadRecord)."""
    words = clean_text(text, max_words)
    if not words:
        raise BadRecord(f"key {key!r} has no words left after cleaning: {text!r:.60}")
    return words


def image_file(root, relative: str) -> str:
    """root/relative, which must be a file (else BadRecord)."""
    path = os.path.join(root, relative)
    if not os.path.isfile(path):
        raise BadRecord(f"image {path} does not exist")
    return path


def vqa_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """Record -> [sample] of VQA: train {image, question, answers, weights}, test {image, question, question_id,
    answers (raw, or None)}; images under vqa_root / vg_root / gqa_root by the record's "dataset" (test default vqa)."""
    max_words = cfg["max_words"]

    def parse(record: dict) -> List[dict]:
        dataset = record.get("dataset", "vqa") if split == "test" else field(record, "dataset", str, "'vqa', 'vg' or 'gqa'")
        if not isinstance(dataset, str) or dataset not in VQA_ROOTS:
            raise BadRecord(f"key 'dataset' must be one of {sorted(VQA_ROOTS)}, got {dataset!r}")
        root = config_path(cfg, VQA_ROOTS[dataset], "vqa", split)
        try:  # the raw question, OCR tokens and object tags as the authors' launchers feed them (data/vqa_inputs.py)
            question = authors_question(text_field(record, "question"), record, cfg["add_ocr"], cfg["add_object"], max_words)
        except ValueError as error:
            raise BadRecord(str(error)) from None
        sample = {"image": image_file(root, text_field(record, "image")), "question": question}
        if split == "test":
            sample["question_id"] = field(record, "question_id", (int, str), "an int or a string")
            sample["answers"] = texts_field(record, "answer", True) if "answer" in record else None
            return [sample]
        answers = [clean_answer(a, cfg["answer_max_words"]) for a in texts_field(record, "answer", True)]
        sample["answers"], sample["weights"], _ = vqa_answer_weights([answers], "vqa" if dataset == "vqa" else "vg")
        return [sample]

    return parse


def caption_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """Karpathy record -> train: one {image, caption, image_id} per sentence; test: one {image, image_id,
    references (raw sentences)}; image_id = "cocoid" when present, else the file name; image image_root/filepath/filename."""
    root = config_path(cfg, "image_root", "caption", split)

    def parse(record: dict) -> List[dict]:
        path = image_file(root, os.path.join(text_field(record, "filepath"), text_field(record, "filename")))
        sentences = field(record, "sentences", list, "a non-empty list of {'raw': caption}")
        if not sentences or not all(isinstance(s, dict) and isinstance(s.get("raw"), str) and s["raw"].strip() for s in sentences):
            raise BadRecord(f"key 'sentences' must be a non-empty list of {{'raw': non-empty caption}}, got {sentences!r:.80}")
        raw = [sentence["raw"] for sentence in sentences]
        image_id = record.get("cocoid", record["filename"])
        if split == "test":
            return [{"image": path, "image_id": image_id, "references": raw}]
        # raw and lower-cased, punctuation kept: the authors' dataset/caption_dataset.py:185 (no pre_caption)
        # each sample also carries every lower-cased sentence of its image, the SCST reward's references
        # (the authors' gold_caption, dataset/caption_dataset.py coco_dataset)
        references = [text.lower() for text in raw]
        return [{"image": path, "image_id": image_id, "caption": text.lower(), "references": references} for text in raw]

    return parse


def retrieval_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """Retrieval record -> train {image, caption, image_id (as in the file)}, test {image, captions (cleaned)}."""
    root = config_path(cfg, "image_root", "retrieval", split)

    def parse(record: dict) -> List[dict]:
        sample = {"image": image_file(root, text_field(record, "image"))}
        if split == "test":
            return [{**sample, "captions": [cleaned(t, cfg["max_words"], "caption") for t in texts_field(record, "caption", False)]}]
        sample["caption"] = cleaned(text_field(record, "caption"), cfg["max_words"], "caption")
        sample["image_id"] = field(record, "image_id", (int, str), "an int or a string")
        return [sample]

    return parse


def pretrain_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """Pretraining record -> {image, captions (cleaned; one is drawn per epoch)}."""
    root = config_path(cfg, "image_root", "pretrain", split)

    def parse(record: dict) -> List[dict]:
        captions = [cleaned(t, cfg["max_words"], "caption") for t in texts_field(record, "caption", True)]
        return [{"image": image_file(root, text_field(record, "image")), "captions": captions}]

    return parse


NLVR_LABELS = {"False": 0, "True": 1, False: 0, True: 1}


def ve_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """SNLI-VE record -> {image, sentence (cleaned), label (index into mplug.tasks.classification.VE_LABELS)}."""
    root = config_path(cfg, "image_root", "ve", split)

    def parse(record: dict) -> List[dict]:
        label = field(record, "label", str, f"one of {list(VE_LABELS)}")
        if label not in VE_LABELS:
            raise BadRecord(f"key 'label' must be one of {list(VE_LABELS)}, got {label!r}")
        image = text_field(record, "image")
        # The authors' JSON names the Flickr30k id without ".jpg" and they append it (dataset/ve_dataset.py:24).
        if not os.path.isfile(os.path.join(root, image)) and os.path.isfile(os.path.join(root, image + ".jpg")):
            image += ".jpg"
        return [{"image": image_file(root, image),
                 "sentence": cleaned(text_field(record, "sentence"), cfg["max_words"], "sentence"), "label": VE_LABELS.index(label)}]

    return parse


def nlvr_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """NLVR2 record -> {images (the pair's two paths), sentence (cleaned), label (1 = true)}."""
    root = config_path(cfg, "image_root", "nlvr", split)

    def parse(record: dict) -> List[dict]:
        pair = texts_field(record, "images", False)
        if len(pair) != 2:
            raise BadRecord(f"key 'images' must hold two image paths (left, right), got {len(pair)}")
        label = record.get("label")
        if "label" not in record or not isinstance(label, (str, bool)) or label not in NLVR_LABELS:
            raise BadRecord(f"key 'label' must be 'True', 'False' or a bool, got {label!r}")
        return [{"images": [image_file(root, path) for path in pair],
                 "sentence": cleaned(text_field(record, "sentence"), cfg["max_words"], "sentence"), "label": NLVR_LABELS[label]}]

    return parse


def normalised_box(bbox, width: int, height: int) -> List[float]:
    """Pixel [x, y, w, h] in a width x height image -> (cx, cy, w, h) normalised to [0, 1], clipped to the image
    (BadRecord when it is not four numbers, or nothing of it lies inside the image). Each number is first truncated
    to an int as the authors' np.array(bbox, dtype=int) does (dataset/grounding_dataset.py:290-292)."""
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bbox):
        raise BadRecord(f"key 'bbox' must be four numbers [x, y, w, h] in pixels, got {bbox!r:.60}")
    if not all(math.isfinite(v) for v in bbox):
        raise BadRecord(f"key 'bbox' must be finite numbers, got {bbox!r:.60}")
    bbox = [int(v) for v in bbox]
    x0, y0 = max(float(bbox[0]), 0.0), max(float(bbox[1]), 0.0)
    x1, y1 = min(float(bbox[0] + bbox[2]), width), min(float(bbox[1] + bbox[3]), height)
    if not (x1 > x0 and y1 > y0):
        raise BadRecord(f"key 'bbox' {bbox} has no area inside the {width}x{height} image")
    return [(x0 + x1) / 2 / width, (y0 + y1) / 2 / height, (x1 - x0) / width, (y1 - y0) / height]


def grounding_parser(cfg: dict, split: str) -> Callable[[dict], List[dict]]:
    """Grounding record -> {image, text (raw, lower-cased), box (normalised cx, cy, w, h as mplug.tasks.grounding takes)}; the image
    header is read up front for its size."""
    root = config_path(cfg, "image_root", "grounding", split)

    def parse(record: dict) -> List[dict]:
        path = image_file(root, text_field(record, "image"))
        text = text_field(record, "text" if "text" in record or "sentence" not in record else "sentence")
        try:
            with Image.open(path) as image:
                width, height = image.size
        except (OSError, ValueError) as error:
            raise BadRecord(f"cannot read image {path} ({error})") from None
        box = normalised_box(field(record, "bbox", list, "four numbers [x, y, w, h] in pixels"), width, height)
        # raw and lower-cased, punctuation kept: the authors' dataset/grounding_dataset.py:317 (phrase.lower()); the
        # query is then cut to max_tokens word pieces with [CLS] and [SEP] (their max_query_len 20, :74-92)
        return [{"image": path, "text": text.lower(), "box": box}]

    return parse


PARSERS: Dict[str, Callable] = {"vqa": vqa_parser, "caption": caption_parser, "retrieval": retrieval_parser,
                                "pretrain": pretrain_parser, "ve": ve_parser, "nlvr": nlvr_parser,
                                "grounding": grounding_parser}


def answer_list(cfg: dict) -> List[str]:
    """The VQA answer-list JSON (a non-empty list of non-empty strings)."""
    path = config_path(cfg, "answer_list", "vqa", "test")
    answers = load_json_list(path, "answer list")
    if not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise ValueError(f"{path}: the answer list must be a non-empty JSON list of non-empty strings")
    return answers


def image_source(sample: dict) -> str:
    """'<file>: record <i>' of a sample, for errors raised when its image is opened."""
    file, index = sample["source"]
    return f"{Path(file)}: record {index}"
