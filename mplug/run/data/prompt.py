"""The caption prompt (config ``prompt``) as training joins it to the captions and as generation feeds it.

prompt_mode ``authors`` (caption_mplug.py:50-51): ``config['prompt'] + caption``, no space added, so a prompt that
ends in a word ("a picture of") fuses that word with the caption's first ("ofa"), and one that ends in a space ("a
picture of ") keeps its words. prompt_mode ``vatex`` (model_caption_mplug_vatex.py:32, videocap_mplug.py:46):
``prompt caption``, every prompt token kept. Generation is seeded with "[CLS]" + the prompt tokens that start every
training caption of the mode, so the decoder continues from the ids it was trained on; the search returns only the
continuation, which is the caption written (the prompt is not part of it).
"""
from __future__ import annotations

from typing import List

from mplug.run.authors_options import PROMPT_MODES


def training_prompt(prompt: str) -> str:
    """config ``prompt`` as training joins it: lower case, runs of whitespace one space, stripped in front; a trailing
    space is kept (their ``config['prompt'] + caption`` keeps it)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
    words = " ".join(prompt.lower().split())
    return f"{words} " if words and prompt[-1].isspace() else words


def generation_prompt_ids(tokenizer, prompt: str, mode: str) -> List[int]:
    """The prompt's token ids (no [CLS]) that begin every training caption of ``mode``: all of them, except in
    'authors' mode the last word's when it fuses with the caption's first word (the prompt ends in a word)."""
    if mode not in PROMPT_MODES:
        raise ValueError(f"prompt_mode must be one of {PROMPT_MODES}, got {mode!r}")
    text = training_prompt(prompt)
    if mode == "authors" and text:
        pieces = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)
        joined = tokenizer.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text + "a")
        if len(joined) == len(pieces):  # the last piece took the caption's first letter
            text = text[: pieces[-1][1][0]]
    return tokenizer(text, add_special_tokens=False)["input_ids"]
