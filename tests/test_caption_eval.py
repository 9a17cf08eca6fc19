"""Caption metrics through pycocoevalcap (mplug.run.caption_eval), as the authors' language_evaluation.CocoEvaluator
runs them (AliceMind mPLUG/caption_mplug.py:161-171), on hand-worked examples; and our CIDEr-D (mplug.tasks.cider, the
SCST reward) equal to pycocoevalcap's CIDEr-D (pycocoevalcap/cider/cider_scorer.py) on the same tokens."""
import math

import pytest

from mplug.run import caption_eval
from mplug.tasks.cider import CiderD

needs_java = pytest.mark.skipif(caption_eval.unavailable_reason() is not None, reason=str(caption_eval.unavailable_reason()))


@needs_java
def test_ptb_tokenizer_lower_cases_splits_clitics_and_drops_punctuation():
    tokens = caption_eval.ptb_tokenize({"x": ["A dog, running.", "The man's hat!"], 3: ["Two  cats?"]})
    assert tokens == {"x": ["a dog running", "the man 's hat"], 3: ["two cats"]}


@needs_java
def test_coco_caption_scores_hand_worked():
    # Image A: "dogs run" vs ["dogs run"]; image B: "cats" vs ["cats sleep"] (after PTB tokenisation). N = 2 images,
    # every n-gram in one image: idf log 2.
    scores = caption_eval.coco_caption_scores(["Dogs run.", "cats"], [["dogs run"], ["Cats sleep"]])
    # BLEU: all 3 candidate words match, 1 of 1 bigram; c = 3 words, r = 2 + 2 -> brevity exp(1 - 4/3).
    brevity = math.exp(1 - 4 / 3)
    assert scores["Bleu_1"] == pytest.approx(brevity, rel=1e-6)
    assert scores["Bleu_2"] == pytest.approx(brevity, rel=1e-6)
    # ROUGE-L (beta 1.2): A exact = 1; B LCS 1, P 1, R 1/2 -> (1 + 1.44) * 0.5 / (0.5 + 1.44).
    assert scores["ROUGE_L"] == pytest.approx((1 + 2.44 * 0.5 / 1.94) / 2, rel=1e-6)
    # CIDEr-D: A cosine 1 for n = 1, 2, 0 for 3, 4 -> 10 * 2/4 = 5; B unigram cosine 1/sqrt 2 only, length
    # penalty exp(-1/72) -> 10 * (1/sqrt 2) / 4 * exp(-1/72).
    assert scores["CIDEr"] == pytest.approx((5 + 10 / math.sqrt(2) / 4 * math.exp(-1 / 72)) / 2, rel=1e-6)
    assert 0 < scores["METEOR"] <= 1
    exact = caption_eval.coco_caption_scores(["dogs run", "cats sleep"], [["dogs run"], ["cats sleep"]])
    assert exact["METEOR"] > scores["METEOR"] and exact["ROUGE_L"] == pytest.approx(1.0)


def test_our_cider_d_equals_pycocoevalcap_cider_d_on_the_same_tokens():
    cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider_scorer", reason="pycocoevalcap is not installed")
    references = [
        ["a man riding a horse on a beach", "a person rides a horse near the sea", "a man on a horse"],
        ["two dogs playing with a ball", "a dog and a dog play ball in the grass"],
        ["a plate of food with a fork", "food on a white plate", "a fork next to a plate of food", "a meal"],
        ["a man riding a bike down the street"],
    ]
    candidates = ["a man riding a horse", "a dog playing with a ball in the grass", "a plate of food", "a man on a horse"]
    theirs = cider_scorer.CiderScorer(n=4, sigma=6.0)
    for candidate, refs in zip(candidates, references):
        theirs += (candidate, refs)
    their_mean, their_scores = theirs.compute_score()
    ours = CiderD([[ref.split() for ref in refs] for refs in references])
    our_scores = [ours.score(c.split(), [r.split() for r in refs]) for c, refs in zip(candidates, references)]
    assert our_scores == pytest.approx(list(their_scores), rel=1e-9)
    assert sum(our_scores) / len(our_scores) == pytest.approx(their_mean, rel=1e-9)
    assert min(our_scores) < max(our_scores)
