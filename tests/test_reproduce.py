"""Issue 24, reproducing the authors' numbers: each test against a hand-worked example from the authors' AliceMind
mPLUG/ code (the file and line named at the test)."""
from pathlib import Path

import torch

from mplug.run import evaluate
from mplug.run.data.text import load_tokenizer
from tiny_dataset import write_vocab


def test_vqa_answers_decode_contractions_as_the_authors_tokenizer(tmp_path):
    # vqa_mplug.py:117: tokenizer.decode(ids) (transformers 4.14.1, requirements.txt: clean_up_tokenization_spaces
    # True) then [SEP]/[CLS]/[PAD] removed and stripped. By hand: [CLS] don ' t [SEP] -> "[CLS] don't [SEP]" -> "don't".
    tokenizer = load_tokenizer(write_vocab(tmp_path / "vocab.txt"))
    rows = [tokenizer(text)["input_ids"] for text in ("don't", "it's red", "yes")]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    assert evaluate.decode(tokenizer, ids, tokenizer.sep_token_id) == ["don't", "it's red", "yes"]
