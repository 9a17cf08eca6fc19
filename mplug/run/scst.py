"""SCST in ``python -m mplug.run.train --task caption --set scst=true``: the reward the authors use
(caption_mplug_scst.py:72-83: their decoding, PTB tokenisation, CIDEr-D with document frequencies from the batch's
references) and the training step module. ``scst_mode: authors`` (default) trains as they do
(mplug.tasks.scst.authors_scst_loss: top beams with gradients, mean-of-beams baseline); ``scst_mode: sample`` is our
variant (mplug.tasks.finetune.caption_scst_loss: sampled captions, greedy baseline, rewards on word ids).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
from torch import nn

from mplug.run import caption_eval
from mplug.tasks.cider import CiderD
from mplug.tasks.scst import authors_scst_loss

def cider_rewards(candidates: Sequence[Sequence[Sequence[str]]], references: Sequence[Sequence[Sequence[str]]]) -> torch.Tensor:
    """CIDEr-D of candidates[b][k] (words) against references[b] (word lists), document frequencies from the batch's
    references -> float64 [B, K]. The authors repeat each image's references once per beam (caption_mplug_scst.py:80)
    before their compute_ciders, which scales every document frequency and the image count alike: the same idf."""
    scorer = CiderD(references)
    return torch.tensor([[scorer.score(c, references[b]) for c in row] for b, row in enumerate(candidates)], dtype=torch.float64)


def ptb_cider_rewards(candidates: Sequence[Sequence[str]], references: Sequence[Sequence[str]]) -> torch.Tensor:
    """cider_rewards of caption strings [B][K] against reference strings [B][..], both PTB-tokenised as the COCO
    evaluation does (needs java)."""
    flat = {(b, k): [c] for b, row in enumerate(candidates) for k, c in enumerate(row)}
    flat.update({("ref", b): list(refs) for b, refs in enumerate(references)})
    words = {key: [sentence.split() for sentence in sentences] for key, sentences in caption_eval.ptb_tokenize(flat).items()}
    cands = [[words[(b, k)][0] for k in range(len(row))] for b, row in enumerate(candidates)]
    return cider_rewards(cands, [words[("ref", b)] for b in range(len(references))])


def decode_caption(tokenizer, ids: Sequence[int]) -> str:
    """Generated ids (before the end token) -> text as the authors decode SCST beams (caption_mplug_scst.py:75:
    tokenizer.decode, then [SEP], [CLS], [PAD] removed and stripped)."""
    text = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=True)
    for token in ("[SEP]", "[CLS]", "[PAD]"):
        text = text.replace(token, "")
    return text.strip()


class ScstLoss(nn.Module):
    """The SCST training step as a module (forward(images, references[, prompt_ids]) -> loss), as train.TaskLoss."""

    def __init__(self, model: nn.Module, cfg: dict, tokenizer):
        super().__init__()
        reason = caption_eval.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"scst: the CIDEr-D reward tokenises with the COCO PTB tokenizer, which is unavailable: {reason}")
        self.model, self.cfg, self.tokenizer = model, cfg, tokenizer

    def forward(self, images: torch.Tensor, references: List[List[str]], prompt_ids=None) -> torch.Tensor:
        search = dict(min_length=self.cfg["min_length"], max_length=self.cfg["max_length"])
        if self.cfg["scst_mode"] == "authors":
            def reward(ids):
                captions = [[decode_caption(self.tokenizer, beam) for beam in row] for row in ids]
                return ptb_cider_rewards(captions, references)

            return authors_scst_loss(self.model, images, reward, num_beams=self.cfg["num_beams"], prompt_ids=prompt_ids, **search)[0]
        encoded = [[self.tokenizer(ref, add_special_tokens=False)["input_ids"] for ref in refs] for refs in references]
        cider = CiderD(encoded)
        return self.model.caption_scst_loss(images, encoded, cider, num_samples=self.cfg["num_beams"], **search)[0]
