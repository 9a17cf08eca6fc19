"""Text side of the data readers: the authors' caption/question cleaning and the BERT tokenizer from a vocab.txt."""
from __future__ import annotations

import re
from pathlib import Path

# The characters the authors' pre_caption / pre_question delete; "-" and "/" become spaces.
DELETED = re.compile(r"[,.'!?\"()*#:;~]")
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def clean_text(text: str, max_words: int) -> str:
    """The authors' pre_caption / pre_question rule: lower case, delete , . ' ! ? " ( ) * # : ; ~, "-" and "/" -> space,
    "<person>" -> "person", runs of whitespace -> one space, stripped, then the first max_words words."""
    text = DELETED.sub("", text.lower()).replace("-", " ").replace("/", " ").replace("<person>", "person")
    return " ".join(text.split()[:max_words])


def clean_answer(text: str, max_words: int) -> str:
    """A VQA answer as the authors feed it (they do not strip punctuation): lower case, whitespace collapsed, the
    first max_words words."""
    return " ".join(text.lower().split()[:max_words])


def load_tokenizer(vocab_path):
    """transformers.BertTokenizerFast (lower case) over a BERT vocab.txt; no download. The file must hold [PAD],
    [UNK], [CLS], [SEP] and [MASK]."""
    from transformers import BertTokenizerFast

    if vocab_path is None:
        raise ValueError("config key 'vocab' is not set: pass --set vocab=PATH/vocab.txt (a BERT vocabulary)")
    path = Path(vocab_path)
    if not path.is_file():
        raise ValueError(f"vocab: {path} is not a file (config key 'vocab' must name a BERT vocab.txt)")
    tokens = set(path.read_text(encoding="utf-8").split("\n"))
    missing = [token for token in SPECIAL_TOKENS if token not in tokens]
    if missing:
        raise ValueError(f"vocab: {path} lacks the special tokens {missing}; a BERT vocab.txt has all of {SPECIAL_TOKENS}")
    return BertTokenizerFast(vocab=str(path), do_lower_case=True)


def check_vocabulary(tokenizer, model_config) -> None:
    """The tokenizer's size and special-token ids must match the model's (MPLUGConfig vocab_size, bos/eos/pad/mask ids)."""
    expected = {"[CLS]": model_config.bos_token_id, "[SEP]": model_config.eos_token_id,
                "[PAD]": model_config.pad_token_id, "[MASK]": model_config.mask_token_id}
    got = {token: tokenizer.convert_tokens_to_ids(token) for token in expected}
    if got != expected or len(tokenizer) > model_config.vocab_size:
        raise ValueError(
            f"vocab: the tokenizer has {len(tokenizer)} tokens with ids {got}; the model takes at most "
            f"{model_config.vocab_size} tokens with ids {expected}"
        )
