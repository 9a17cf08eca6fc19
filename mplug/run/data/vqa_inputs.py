"""The VQA question as the authors' launchers feed it (AliceMind mPLUG/dataset/vqa_dataset.py:56-70 with --add_ocr
--add_object): the raw question (their pre_question call is commented out, :70), then " [SEP] " and the record's OCR
tokens, then " [SEP] " and its object tags."""
from __future__ import annotations

import re

DELETED = re.compile(r"[,.'!?\"()*#:;~]")


def pre_question(text: str, max_words: int) -> str:
    """The authors' pre_question (dataset/utils.py:3-16): lower case, delete , . ' ! ? " ( ) * # : ; ~, "-" and "/" ->
    space, trailing spaces stripped, then the first max_words of its single-space-separated words."""
    text = DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").rstrip(" ")
    return " ".join(text.split(" ")[:max_words])


def ocr_tokens(record: dict) -> list:
    """The tokens of the record's "ocr" list of [position, token] pairs (ValueError when it is not one)."""
    pairs = record["ocr"]
    if not isinstance(pairs, list) or not all(isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[1], str) for p in pairs):
        raise ValueError(f"key 'ocr' must be a list of [position, token] pairs, got {pairs!r:.60}")
    return [token for _, token in pairs]


def authors_question(question: str, record: dict, add_ocr: bool, add_object: bool, max_ocr_words: int) -> str:
    """The record's question (its checked "question" text) as the authors feed it: raw, with " [SEP] " + the OCR tokens (pre_question, at most
    max_ocr_words words; the authors' max_ques_words is 30 with --add_ocr) when add_ocr and the record has any, and
    " [SEP] " + its "&&"-separated "object_label" tags when add_object and the record has them."""
    if add_ocr and "ocr" in record:
        tokens = ocr_tokens(record)
        if tokens:
            question += " [SEP] " + pre_question(" ".join(tokens), max_ocr_words)
    if add_object and "object_label" in record:
        objects = record["object_label"]
        if not isinstance(objects, str):
            raise ValueError(f"key 'object_label' must be a string of '&&'-separated tags, got {objects!r:.60}")
        question += " [SEP] " + " ".join(objects.split("&&"))
    return question
