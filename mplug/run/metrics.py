"""Evaluation metrics, written from their published definitions: VQA accuracy (the VQA challenge's answer
normalisation and 10-choose-9 human consensus), CIDEr-D (mplug.tasks.cider over the evaluated set's references),
corpus BLEU-4, and image-text retrieval recall@K both ways.

Scores come as the benchmarks report them: VQA accuracy and recall@K in percent, CIDEr-D and BLEU-4 as fractions
(CIDEr-D's x10 included).
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Mapping, Sequence

import torch

from mplug.tasks.cider import CiderD, ngram_counts

# Marks the VQA normalisation replaces by a space, or drops where they touch a space or the answer holds a
# digit-comma-digit group (periods, apostrophes and colons are not among them).
VQA_PUNCTUATION = ";/[]\"{}()=+\\_-><@`,?!"
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = frozenset({"a", "an", "the"})
# Contractions written without their apostrophe -> the spelling the ground truth uses. Words that are also
# ordinary words without an apostrophe (its, ill, were, well, shell, hell, wed, id, lets) are left alone.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldntve": "couldn't've", "couldn'tve": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadntve": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hedve": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "im": "i'm", "ive": "i've", "isnt": "isn't", "itd": "it'd", "itdve": "it'd've",
    "it'dve": "it'd've", "itll": "it'll", "maam": "ma'am", "mightnt": "mightn't", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock",
    "shant": "shan't", "shed": "she'd", "shes": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldntve": "shouldn't've", "shouldn'tve": "shouldn't've", "thatll": "that'll", "thats": "that's",
    "thered": "there'd", "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whend": "when'd", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyd": "why'd", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldntve": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "youd": "you'd", "youll": "you'll", "youre": "you're", "youve": "you've",
}
DIGIT_COMMA_DIGIT = re.compile(r"\d,\d")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
CAPTION_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def _strip_punctuation(text: str) -> str:
    """The VQA punctuation step: each mark is dropped where it touches a space in ``text`` (or ``text`` has a
    digit-comma-digit group, so 100,978 -> 100978), else replaced by a space; then periods not before a digit go."""
    joined_digits = DIGIT_COMMA_DIGIT.search(text) is not None
    out = text
    for mark in VQA_PUNCTUATION:
        if mark + " " in text or " " + mark in text or joined_digits:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out)


def normalize_vqa_answer(answer: str) -> str:
    """The VQA challenge's answer normalisation: punctuation, lower case, number words -> digits, articles
    dropped, missing contraction apostrophes added ("Two dogs." -> "2 dogs", "dont" -> "don't")."""
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a str, got {type(answer).__name__}")
    words = _strip_punctuation(answer.replace("\n", " ").replace("\t", " ").strip()).lower().split()
    words = [NUMBER_WORDS.get(word, word) for word in words]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def vqa_score(answer: str, human_answers: Sequence[str]) -> float:
    """One question's VQA accuracy in [0, 1]: min(#matching humans / 3, 1) averaged over the subsets that leave
    one human out (10 choose 9 for VQA's 10 answers; a lone human answer is its own subset), after normalisation."""
    if isinstance(human_answers, str) or len(human_answers) == 0:
        raise ValueError(f"human_answers must be a non-empty list of str, got {human_answers!r}")
    answer = normalize_vqa_answer(answer)
    matches = [normalize_vqa_answer(human) == answer for human in human_answers]
    if len(matches) == 1:
        return min(matches[0] / 3.0, 1.0)
    total = sum(matches)
    return sum(min((total - left_out) / 3.0, 1.0) for left_out in matches) / len(matches)


def vqa_accuracy(answers: Mapping, human_answers: Mapping) -> float:
    """Mean VQA accuracy in percent over the questions of ``human_answers`` (question id -> list of str);
    ``answers`` maps every one of those question ids to the predicted str."""
    missing = [question for question in human_answers if question not in answers]
    if not human_answers or missing:
        raise ValueError(f"answers must cover every question of human_answers (non-empty); missing ids {missing[:5]}")
    return 100.0 * sum(vqa_score(answers[q], humans) for q, humans in human_answers.items()) / len(human_answers)


def caption_tokens(sentence: str) -> List[str]:
    """Lower-cased words of a caption, punctuation dropped (a simplified PTB tokenisation, as COCO evaluation
    tokenises before scoring): "A dog's ball." -> ["a", "dog's", "ball"]."""
    return CAPTION_WORD.findall(sentence.lower())


def _check_caption_inputs(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(candidates) == 0 or len(candidates) != len(references):
        raise ValueError(
            f"candidates ({len(candidates)}) and references ({len(references)}) must be equally long and non-empty"
        )
    for index, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"references[{index}] must be a non-empty list of sentences, got {refs!r}")


def cider_d(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr-D (mplug.tasks.cider.CiderD): mean over images of candidate i vs references[i] (sentences), the
    document frequencies taken from all of ``references``, as the COCO evaluation does."""
    _check_caption_inputs(candidates, references)
    tokenized = [[caption_tokens(ref) for ref in refs] for refs in references]
    scorer = CiderD(tokenized)
    return sum(scorer.score(caption_tokens(c), refs) for c, refs in zip(candidates, tokenized)) / len(candidates)


def bleu(candidates: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4) -> float:
    """Corpus BLEU-max_n (Papineni et al. 2002): geometric mean of the corpus-clipped n-gram precisions, n = 1..max_n,
    times the brevity penalty exp(1 - r / c) when c < r (c candidate words, r the closest reference lengths, ties to
    the shorter). Zero when some order has no match."""
    _check_caption_inputs(candidates, references)
    matched, proposed = [0] * max_n, [0] * max_n
    candidate_length = reference_length = 0
    for candidate, refs in zip(candidates, references):
        words, ref_words = caption_tokens(candidate), [caption_tokens(ref) for ref in refs]
        candidate_length += len(words)
        reference_length += min((abs(len(ref) - len(words)), len(ref)) for ref in ref_words)[1]
        for n in range(1, max_n + 1):
            counts = ngram_counts(words, n)
            most = Counter()
            for ref in ref_words:
                most |= ngram_counts(ref, n)
            matched[n - 1] += sum(min(count, most[gram]) for gram, count in counts.items())
            proposed[n - 1] += sum(counts.values())
    if min(matched) == 0:
        return 0.0
    log_precision = sum(math.log(m / p) for m, p in zip(matched, proposed)) / max_n
    brevity = 1.0 if candidate_length >= reference_length else math.exp(1.0 - reference_length / candidate_length)
    return brevity * math.exp(log_precision)


def _recall(ranks: torch.Tensor, ks: Sequence[int]) -> Dict[int, float]:
    return {k: 100.0 * (ranks < k).double().mean().item() for k in ks}


def retrieval_recall(
    i2t: torch.Tensor, t2i: torch.Tensor, text_image: Sequence[int], ks: Sequence[int] = (1, 5, 10)
) -> Dict[str, float]:
    """Recall@K in percent from scores i2t [Ni, Nt] (image -> text) and t2i [Nt, Ni]; text t shows image
    text_image[t]. Image -> text: an image counts if any of its texts ranks in its top K; text -> image: its image
    does. Keys i2t_r1.. / t2i_r1.. and their means r_mean."""
    text_image = torch.as_tensor(text_image, dtype=torch.long)
    num_images, num_texts = i2t.shape if i2t.dim() == 2 else (-1, -1)
    if t2i.shape != (num_texts, num_images) or text_image.shape != (num_texts,):
        raise ValueError(
            f"i2t must be [Ni, Nt], t2i [Nt, Ni] and text_image [Nt]; got {tuple(i2t.shape)}, {tuple(t2i.shape)}, "
            f"{tuple(text_image.shape)}"
        )
    if num_texts and (text_image.min() < 0 or text_image.max() >= num_images):
        raise ValueError(f"text_image values must index the {num_images} images, got range "
                         f"[{int(text_image.min())}, {int(text_image.max())}]")
    text_order = i2t.double().argsort(dim=1, descending=True, stable=True)
    is_own_text = text_image[text_order] == torch.arange(num_images)[:, None]
    if not bool(is_own_text.any(dim=1).all()):
        raise ValueError("every image needs at least one text in text_image")
    image_ranks = is_own_text.double().argmax(dim=1)
    image_order = t2i.double().argsort(dim=1, descending=True, stable=True)
    text_ranks = (image_order == text_image[:, None]).double().argmax(dim=1)
    result = {f"i2t_r{k}": v for k, v in _recall(image_ranks, ks).items()}
    result.update({f"t2i_r{k}": v for k, v in _recall(text_ranks, ks).items()})
    result["r_mean"] = sum(result.values()) / len(result)
    return result
