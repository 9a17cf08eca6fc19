"""Evaluation metrics (mplug.run.metrics) against values computed by hand on small examples."""
import math

import pytest
import torch

from mplug.run.metrics import bleu, caption_tokens, cider_d, normalize_vqa_answer, retrieval_recall, vqa_accuracy, vqa_score


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("2 dogs", "2 dogs"),
        ("The cat", "cat"),
        ("an apple and a pear", "apple and pear"),
        ("dont know", "don't know"),
        ("Isnt it", "isn't it"),
        ("none", "0"),
        ("100,978", "100978"),
        ("2.5", "2.5"),
        ("t-shirt", "t shirt"),
        ("yes!", "yes"),
        ("Yes ?", "yes"),
        ("2:50 pm", "2:50 pm"),
        ("girl's", "girl's"),
        ("  red\tand\nblue ", "red and blue"),
    ],
)
def test_vqa_normalization(raw, normalized):
    assert normalize_vqa_answer(raw) == normalized


def test_vqa_score_leave_one_out_by_hand():
    """2 of 10 humans match: the 2 subsets without a matching human have 1 match (1/3), the 8 others 2 (2/3):
    (2/3 + 16/3) / 10 = 0.6. 3 matches: (3 * 2/3 + 7 * 1) / 10 = 0.9; 4 or more: 1; none: 0."""
    others = ["3"] * 8
    assert vqa_score("2", ["2", "two"] + others) == pytest.approx(0.6)
    assert vqa_score("Two.", ["2"] * 3 + ["3"] * 7) == pytest.approx(0.9)
    assert vqa_score("2", ["2"] * 4 + ["3"] * 6) == 1.0
    assert vqa_score("4", ["2"] * 10) == 0.0
    assert vqa_score("dont know", ["don't know"] * 10) == 1.0
    assert vqa_score("yes", ["yes"]) == pytest.approx(1 / 3)


def test_vqa_accuracy_is_percent_mean_and_checks_coverage():
    humans = {1: ["2", "2"] + ["3"] * 8, 2: ["yes"] * 10}
    assert vqa_accuracy({1: "two", 2: "Yes."}, humans) == pytest.approx(100 * (0.6 + 1.0) / 2)
    with pytest.raises(ValueError, match="missing ids \\[2\\]"):
        vqa_accuracy({1: "2"}, humans)
    with pytest.raises(ValueError, match="non-empty"):
        vqa_score("2", [])


def test_caption_tokens():
    assert caption_tokens("A dog's ball, on the GRASS.") == ["a", "dog's", "ball", "on", "the", "grass"]


def test_cider_d_document_frequencies_from_the_evaluated_set_by_hand():
    """2 images, every word in one image's references: idf log 2. 'a b' = its reference: n = 1 and 2 give cosine 1,
    10 * 2 / 4 = 5. 'c x' vs 'c d': unigram c shared, log2^2 / (sqrt2 log2)^2 = 0.5, no bigram: 10 * 0.5 / 4 = 1.25.
    Mean 3.125; punctuation and case do not count."""
    assert cider_d(["A b.", "c x"], [["a b"], ["c d"]]) == pytest.approx(3.125)
    with pytest.raises(ValueError, match="references\\[1\\]"):
        cider_d(["a", "b"], [["a"], []])


def test_bleu4_by_hand():
    """Corpus precisions 7/8, 5/6, 3/4, 1/2 (clipped, summed over sentences), no brevity penalty."""
    expected = (7 / 8 * 5 / 6 * 3 / 4 * 1 / 2) ** 0.25
    assert bleu(["a b c d", "e f g h"], [["a b c d"], ["e f g x"]]) == pytest.approx(expected)
    short = bleu(["the cat sat on"], [["the cat sat on the mat"]])
    assert short == pytest.approx(math.exp(1 - 6 / 4))
    assert bleu(["a b c d"], [["a b c", "a b c d e"]]) == 1.0, "closest-length tie goes to the shorter reference"
    assert bleu(["the the the"], [["the cat the"]], max_n=1) == pytest.approx(2 / 3), "counts clipped"
    assert bleu(["x y z w"], [["a b c d"]]) == 0.0


def test_retrieval_recall_by_hand():
    """Texts 0, 1 show image 0 and texts 2, 3 image 1. Image 0's best text is its own (rank 0), image 1's own
    text t3 comes second (rank 1). Texts 0 and 2 find their image first, texts 1 and 3 second."""
    i2t = torch.tensor([[0.1, 0.9, 0.5, 0.3], [0.8, 0.2, 0.1, 0.7]])
    t2i = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.6], [0.7, 0.4]])
    recall = retrieval_recall(i2t, t2i, [0, 0, 1, 1], ks=(1, 2))
    assert recall == {"i2t_r1": 50.0, "i2t_r2": 100.0, "t2i_r1": 50.0, "t2i_r2": 100.0, "r_mean": 75.0}
    ranked_out = i2t.clone()
    ranked_out[1, 3] = float("-inf")
    assert retrieval_recall(ranked_out, t2i, [0, 0, 1, 1], ks=(1, 2))["i2t_r2"] == 50.0
    with pytest.raises(ValueError, match="t2i \\[Nt, Ni\\]"):
        retrieval_recall(i2t, t2i.t(), [0, 0, 1, 1])
    with pytest.raises(ValueError, match="text_image values"):
        retrieval_recall(i2t, t2i, [0, 0, 1, 2])
