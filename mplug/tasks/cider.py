"""CIDEr-D (Vedantam et al., CVPR 2015), written from its definition, over token sequences (words or token ids).

For n = 1..4 each sentence is a vector of n-gram weights tf(g) * log(N / max(1, df(g))), N the number of images in
the training references and df(g) the number of those images whose references hold g. CIDEr-D_n(c, S) =
(10 / |S|) * sum_s exp(-(len(c) - len(s))^2 / (2 sigma^2)) * sum_g min(c_g, s_g) s_g / (|c| |s|), sigma 6, and
CIDEr-D is the mean over n.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import Dict, Hashable, List, Sequence

Tokens = Sequence[Hashable]


def ngram_counts(tokens: Tokens, n: int) -> Counter:
    """Counts of the n-grams (tuples) of one token sequence."""
    tokens = tuple(tokens)
    return Counter(tokens[i : i + n] for i in range(len(tokens) - n + 1))


class CiderD:
    """CIDEr-D scorer with document frequencies from ``corpus``: the training references, one list of token
    sequences per image."""

    def __init__(self, corpus: Sequence[Sequence[Tokens]], n: int = 4, sigma: float = 6.0):
        if not corpus or any(not references for references in corpus):
            raise ValueError("corpus must hold at least one image, each with at least one reference")
        self.n, self.sigma = n, sigma
        self.log_images = math.log(len(corpus))
        self.document_frequency: Counter = Counter()
        for references in corpus:
            self.document_frequency.update({g for ref in references for k in range(1, n + 1) for g in ngram_counts(ref, k)})

    def _vectors(self, tokens: Tokens) -> List[Dict[tuple, float]]:
        """Per n, the tf-idf weights of the n-grams of ``tokens``."""
        return [
            {g: count * (self.log_images - math.log(max(1.0, self.document_frequency[g]))) for g, count in ngram_counts(tokens, k).items()}
            for k in range(1, self.n + 1)
        ]

    def score(self, candidate: Tokens, references: Sequence[Tokens]) -> float:
        """CIDEr-D of one candidate against its image's references (token sequences)."""
        if not references:
            raise ValueError("references must hold at least one token sequence")
        candidate_vectors = self._vectors(candidate)
        total = 0.0
        for reference in references:
            penalty = math.exp(-((len(candidate) - len(reference)) ** 2) / (2 * self.sigma ** 2))
            for c, r in zip(candidate_vectors, self._vectors(reference)):
                norms = math.sqrt(sum(v * v for v in c.values())) * math.sqrt(sum(v * v for v in r.values()))
                if norms > 0:
                    total += penalty * sum(min(weight, r[g]) * r[g] for g, weight in c.items() if g in r) / norms
        return 10.0 * total / (self.n * len(references))
