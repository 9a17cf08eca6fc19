"""Reader of the official nocaps annotation JSON (nocaps_val_4500_captions.json / nocaps_test_image_info.json):
{"images": [{"id", "file_name", "domain"?, ..}], "annotations": [{"image_id", "caption"}, ..]} -> caption test
samples {"image", "image_id", "domain", "references"} in the file's image order, as records.caption_parser's test
samples (references None for the test split, which has no annotations). A bad image entry or annotation raises
ValueError("<file>: images: record <i>: <what>") or, with a BadRecords that skips, is dropped and reported.
The caption test reader (samples.read_samples) takes a test_file whose JSON is an object (not the Karpathy list) as
nocaps (``is_nocaps_file``).
"""
from __future__ import annotations

from typing import Dict, List, Optional

from mplug.run.data.records import BadRecord, BadRecords, field, image_file, load_json, text_field


def _load(path: str) -> dict:
    data = load_json(path, "nocaps annotation file")
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(f"{path}: a nocaps annotation file is a JSON object with an 'images' list")
    if not isinstance(data.get("annotations", []), list):
        raise ValueError(f"{path}: 'annotations' must be a list")
    return data


def read_nocaps(path: str, image_root: str, bad: Optional[BadRecords] = None) -> List[dict]:
    """Caption test samples of a nocaps JSON (images under image_root by "file_name"), one per image; references
    are the captions of its annotations (None when the file has no "annotations", as the test split)."""
    bad = bad if bad is not None else BadRecords(skip=False)
    data = _load(path)
    has_captions = "annotations" in data
    captions: Dict[object, List[str]] = {}
    for index, annotation in enumerate(data.get("annotations", [])):
        try:
            if not isinstance(annotation, dict):
                raise BadRecord(f"must be a JSON object, got {type(annotation).__name__}")
            image_id = field(annotation, "image_id", int, "an int")
            captions.setdefault(image_id, []).append(text_field(annotation, "caption"))
        except BadRecord as error:
            bad.report(f"{path}: annotations", index, str(error))
    samples = []
    for index, image in enumerate(data["images"]):
        try:
            if not isinstance(image, dict):
                raise BadRecord(f"must be a JSON object, got {type(image).__name__}")
            image_id = field(image, "id", int, "an int")
            sample = {"image": image_file(image_root, text_field(image, "file_name")), "image_id": image_id,
                      "domain": image.get("domain"), "references": captions.get(image_id) if has_captions else None}
            if has_captions and not sample["references"]:
                raise BadRecord(f"image id {image_id} has no caption in 'annotations'")
        except BadRecord as error:
            bad.report(f"{path}: images", index, str(error))
            continue
        samples.append({**sample, "source": (path, index)})
    return samples


def is_nocaps_file(path: str) -> bool:
    """Whether path holds a JSON object (a nocaps file) rather than a list (Karpathy): its first non-space character."""
    try:
        with open(path, encoding="utf-8") as handle:
            start = handle.read(4096).lstrip()[:1]
    except (OSError, UnicodeDecodeError):
        return False  # the Karpathy reader names the problem
    return start == "{"
