"""What every evaluation task does with its rows: each batch's meta as one row per sample, generated ids decoded
as the authors decode them, a progress bar on rank 0, and the ranks' rows gathered back into data set order.
mplug.run.evaluate and mplug.run.evaluate_video share these."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from mplug.run.runtime import all_gather_objects, is_main


def plain_values(value):
    """A tensor element or list of them as Python values (for JSON)."""
    return value.tolist() if isinstance(value, torch.Tensor) else value


def meta_rows(meta: Dict[str, Sequence], size: int) -> List[dict]:
    """A batch's meta (name -> one value per sample) as one dict per sample."""
    for name, values in meta.items():
        if len(values) != size:
            raise ValueError(f"batch meta {name!r} holds {len(values)} values for a batch of {size}")
    return [{name: plain_values(values[i]) for name, values in meta.items()} for i in range(size)]


def decode(tokenizer, sequences: torch.Tensor, eos_token_id: int) -> List[str]:
    """Best-beam ids [B, T] -> text as the authors decode it (vqa_mplug.py:117, caption_mplug.py:122), each cut at its
    first end token."""
    texts = []
    for ids in sequences.tolist():
        end = ids.index(eos_token_id) if eos_token_id in ids else len(ids)
        # transformers 4.14 (the authors' requirements.txt) cleaned up tokenization spaces by default ("don ' t" ->
        # "don't"); transformers >= 5 does not, so ask for it. They keep special tokens other than [SEP]/[CLS]/[PAD].
        text = tokenizer.decode(ids[:end], skip_special_tokens=False, clean_up_tokenization_spaces=True)
        for token in ("[SEP]", "[CLS]", "[PAD]"):
            text = text.replace(token, "")
        texts.append(text.strip())
    return texts


def progress(loader, description: str):
    """tqdm over ``loader`` on rank 0 (stderr), the plain loader elsewhere."""
    if not is_main():
        return loader
    from tqdm.auto import tqdm

    return tqdm(loader, desc=description, dynamic_ncols=True)


def gather_in_dataset_order(rows: List[dict], num_samples: int, world_size: int) -> List[dict]:
    """Every rank's rows back in data set order: the test sampler (unshuffled, unpadded) gives rank r the samples
    r, r + W, r + 2W, ..., so taking the ranks' rows in turn restores the order; each sample must come once."""
    per_rank = all_gather_objects([rows])
    longest = max(len(part) for part in per_rank)
    ordered = [part[i] for i in range(longest) for part in per_rank if i < len(part)]
    if len(ordered) != num_samples or len(per_rank) != world_size:
        raise RuntimeError(f"gathered {len(ordered)} outputs from {len(per_rank)} ranks for {num_samples} test samples")
    return ordered


def unique(rows: List[dict], key: str) -> None:
    """Raise a ValueError when two rows share row[key] (a test set that names a sample twice)."""
    seen = set()
    for row in rows:
        if row[key] in seen:
            raise ValueError(f"the test set holds {key} {row[key]!r} more than once")
        seen.add(row[key])
