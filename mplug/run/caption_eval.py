"""Caption metrics as the field computes them: the COCO caption evaluation (``pycocoevalcap``: Stanford PTB
tokenizer, BLEU-1..4, METEOR 1.5, ROUGE-L, CIDEr-D), the scorers the authors' ``language_evaluation.CocoEvaluator``
runs (caption_mplug.py:161-171). SPICE is not run (it downloads Stanford CoreNLP models on first use).

The tokenizer and METEOR are Java programs: ``java`` must be on PATH (``apt-get install default-jre-headless``), and
``pycocoevalcap`` installed (the ``test`` and ``train`` extras).
"""
from __future__ import annotations

import importlib.util
import shutil
from typing import Dict, List, Mapping, Optional, Sequence

METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")


def unavailable_reason() -> Optional[str]:
    """Why the COCO caption evaluation cannot run here (no java, no pycocoevalcap), or None when it can."""
    if importlib.util.find_spec("pycocoevalcap") is None:
        return "pycocoevalcap is not installed (pip install -e '.[train]' or pip install pycocoevalcap)"
    if shutil.which("java") is None:
        return "java is not on PATH (the PTB tokenizer and METEOR are Java; apt-get install default-jre-headless)"
    return None


def _require() -> None:
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"COCO caption evaluation unavailable: {reason}")


def ptb_tokenize(sentences: Mapping[object, Sequence[str]]) -> Dict[object, List[str]]:
    """The COCO evaluation's Stanford PTB tokenisation (lower case, punctuation tokens dropped) of key -> sentences:
    {"a": ["A dog, running."]} -> {"a": ["a dog running"]}."""
    _require()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(sentences)
    for key in keys:
        if isinstance(sentences[key], str) or len(sentences[key]) == 0:
            raise ValueError(f"sentences[{key!r}] must be a non-empty list of str, got {sentences[key]!r}")
    # The tokenizer keys its lines by position; give it string keys so any hashable key survives.
    indexed = {str(i): [{"caption": s} for s in sentences[key]] for i, key in enumerate(keys)}
    tokenized = PTBTokenizer().tokenize(indexed)
    return {key: tokenized[str(i)] for i, key in enumerate(keys)}


def coco_caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> Dict[str, float]:
    """BLEU-1..4, METEOR, ROUGE-L and CIDEr-D (pycocoevalcap; fractions, CIDEr-D's x10 included) of candidate i
    against references[i] after PTB tokenisation, the CIDEr-D document frequencies from all of ``references``."""
    _require()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if len(candidates) == 0 or len(candidates) != len(references):
        raise ValueError(f"candidates ({len(candidates)}) and references ({len(references)}) must be equally long and non-empty")
    res = ptb_tokenize({i: [c] for i, c in enumerate(candidates)})
    gts = ptb_tokenize({i: list(refs) for i, refs in enumerate(references)})
    scores: Dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(bleu)})
    scores["METEOR"] = float(Meteor().compute_score(gts, res)[0])  # its java process ends when the object is freed
    scores["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    scores["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return scores
