"""Beam search (mplug.model.generation) on toy step functions: the authors' search against hand-computed beams, the
best-first search against brute force and a plain reference search, cache bookkeeping in both."""
import itertools
import math

import pytest
import torch

from mplug.model.generation import beam_search, length_penalty

EOS = 2


class ToyModel:
    """Next-token logits from a random table indexed by (position, last token, sum of tokens mod 3)."""

    def __init__(self, vocab: int, positions: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.table = 2.0 * torch.randn(positions, vocab, 3, vocab, generator=generator, dtype=torch.float64)

    def logits(self, sequences: torch.Tensor) -> torch.Tensor:
        """sequences [N, T] -> logits [N, V], recomputed from the whole prefix (the no-cache path)."""
        return self.table[sequences.shape[1] - 1, sequences[:, -1], sequences.sum(1) % 3]

    def full_prefix_step(self, sequences, parents):
        return self.logits(sequences)

    def cached_step(self):
        """A step that keeps the running sum as a per-row cache and reorders it by ``parents``."""
        cache = {}

        def step(sequences, parents):
            if parents is None:
                cache["sum"] = sequences.sum(1)
            else:
                cache["sum"] = cache["sum"][parents] + sequences[:, -1]
            position = sequences.shape[1] - 1
            return self.table[position, sequences[:, -1], cache["sum"] % 3]

        return step

    def log_prob(self, prompt, tokens, min_length):
        """sum of log p(token | prefix) with the end token banned before ``min_length``, as the search scores it."""
        sequence, total = list(prompt), 0.0
        for position, token in enumerate(tokens):
            log_probs = torch.log_softmax(self.logits(torch.tensor([sequence])), -1)[0]
            if position < min_length and token == EOS:
                return float("-inf")
            total += float(log_probs[token])
            sequence.append(token)
        return total


class ConfidentAfterFirst(ToyModel):
    """The end token is likeliest first, then token 1 is near-certain: a long answer wins only after normalising."""

    def __init__(self):
        self.first = torch.tensor([[0.25, 0.35, 0.40]], dtype=torch.float64).log()
        self.later = torch.tensor([[0.001, 0.998, 0.001]], dtype=torch.float64).log()

    def logits(self, sequences):
        return (self.first if sequences.shape[1] == 1 else self.later).expand(sequences.shape[0], -1)


class TableModel:
    """Next-token probabilities over (a, b, end) = (0, 1, 2) looked up by (prompt token, tokens generated so far);
    unlisted prefixes are uniform."""

    def __init__(self, tables):
        self.tables = tables

    def step(self, sequences, parents):
        rows = []
        for row in sequences.tolist():
            rows.append(self.tables.get((row[0], tuple(row[1:])), [1 / 3] * 3))
        return torch.tensor(rows, dtype=torch.float64).log()


A, B = 0, 1
STOPS_AT_ONCE = {  # the top beam's first token is the end token: the authors' search stops there, best-first goes on
    (): [0.44, 0.11, 0.45],
    (A,): [0.005, 0.005, 0.99],
    (B,): [0.45, 0.35, 0.2],
}
ENDED_BEAM_LIVES_ON = {  # a beam that took the end token is extended further and wins at max_length
    (): [0.5, 0.2, 0.3],
    (A,): [0.6, 0.3, 0.1],
    (EOS,): [0.1, 0.1, 0.8],
    (A, A): [0.2, 0.2, 0.6],
    (EOS, EOS): [0.05, 0.05, 0.9],
}
TOY = TableModel(
    {(0, prefix): p for prefix, p in STOPS_AT_ONCE.items()} | {(1, prefix): p for prefix, p in ENDED_BEAM_LIVES_ON.items()}
)
TOY_SETTINGS = dict(num_beams=2, min_length=0, max_length=3, eos_token_id=EOS, num_return_sequences=2)
pen = lambda t: ((5 + t) / 6) ** 0.6
log = math.log
EXPECTED = {
    ("authors", 0): [([EOS], log(0.45)), ([A], log(0.44))],
    ("best_first", 0): [([A, EOS], (log(0.44) + log(0.99)) / pen(2)), ([EOS], log(0.45))],
    ("authors", 1): [([EOS], log(0.3)), ([EOS, EOS, EOS], (log(0.3) + log(0.8) + log(0.9)) / pen(3))],
}


def assert_beams(got, expected):
    """got [(score, tokens)] equals expected [(tokens, score)]: tokens exactly, scores to 1e-9."""
    assert [tokens for _, tokens in got] == [tuple(tokens) for tokens, _ in expected]
    assert [score for score, _ in got] == pytest.approx([score for _, score in expected], abs=1e-9)


@pytest.mark.parametrize("mode,prompt", list(EXPECTED))
def test_toy_search_gives_the_hand_computed_beams(mode, prompt):
    """Hand-worked: STOPS_AT_ONCE's first step ranks end (0.45) over a (0.44); the authors' search ends there and
    records both, best-first finds a, end (0.44 * 0.99, penalised). ENDED_BEAM_LIVES_ON keeps beams a and end,
    then a a (.5 * .6) and end end (.3 * .8: recorded), and at max_length end end end (.3 * .8 * .9) beats a a end;
    the first record, end (.3 at step 1), is best overall."""
    output = beam_search(TOY.step, torch.tensor([[prompt]]), mode=mode, **TOY_SETTINGS)
    assert_beams(hypotheses(output, 0), EXPECTED[mode, prompt])


@pytest.mark.parametrize("order", [[0, 1], [1, 0]])
def test_examples_ending_at_different_steps_give_their_own_beams(order):
    """Prompt 0 ends after one step, prompt 1 runs to max_length; batched, each gets its hand-computed beams."""
    output = beam_search(TOY.step, torch.tensor([[p] for p in order]), mode="authors", **TOY_SETTINGS)
    for example, prompt in enumerate(order):
        assert_beams(hypotheses(output, example), EXPECTED["authors", prompt])


def test_authors_search_bans_the_end_token_before_min_length():
    """min_length 1 on STOPS_AT_ONCE: step 1 keeps a (.44) and b (.11); step 2 ranks a end, then b a, and stops."""
    output = beam_search(TOY.step, torch.tensor([[0]]), mode="authors", **dict(TOY_SETTINGS, min_length=1))
    assert_beams(hypotheses(output, 0), [([A, EOS], (log(0.44) + log(0.99)) / pen(2)), ([B, A], (log(0.11) + log(0.45)) / pen(2))])


def all_hypotheses(vocab, min_length, max_length):
    """Every finished hypothesis: non-end tokens then the end token, or any max_length tokens."""
    words = [token for token in range(vocab) if token != EOS]
    for length in range(min_length + 1, max_length):
        for body in itertools.product(words, repeat=length - 1):
            yield body + (EOS,)
    for body in itertools.product(words, repeat=max_length - 1):
        for last in range(vocab):
            if last != EOS or max_length - 1 >= min_length:
                yield body + (last,)


def reference_beam_search(model, prompt, num_beams, min_length, max_length):
    """A plain list-based beam search with the same rules, run to max_length: [(score, tokens)] best first."""
    alive, finished = [(0.0, ())], []
    for position in range(max_length):
        candidates = []
        for score, tokens in alive:
            logits = model.logits(torch.tensor([list(prompt) + list(tokens)]))
            log_probs = torch.log_softmax(logits, -1)[0].tolist()
            for token, log_prob in enumerate(log_probs):
                if token == EOS and position < min_length:
                    continue
                candidates.append((score + log_prob, tokens + (token,)))
        for score, tokens in candidates:
            if tokens[-1] == EOS or position == max_length - 1:
                finished.append((score / length_penalty(len(tokens)), tokens))
        growing = sorted((c for c in candidates if c[1][-1] != EOS), key=lambda c: -c[0])
        alive = growing[:num_beams]
    return sorted(finished, key=lambda c: -c[0])


def hypotheses(output, example):
    """[(score, tokens)] of one example from a BeamSearchOutput."""
    rows = zip(output.scores[example].tolist(), output.sequences[example].tolist(), output.lengths[example].tolist())
    return [(score, tuple(tokens[:length])) for score, tokens, length in rows]


@pytest.mark.parametrize("min_length", [0, 1, 2])
def test_exhaustive_beam_matches_brute_force(min_length):
    vocab, max_length, prompt = 3, 4, (1,)
    model = ToyModel(vocab, len(prompt) + max_length, seed=min_length)
    beams = (vocab - 1) ** (max_length - 1)  # wide enough that nothing is ever pruned
    output = beam_search(
        model.full_prefix_step, torch.tensor([prompt]), num_beams=beams, min_length=min_length,
        max_length=max_length, eos_token_id=EOS, num_return_sequences=beams, mode="best_first",
    )
    brute = sorted(
        ((model.log_prob(prompt, h, min_length) / length_penalty(len(h)), h) for h in all_hypotheses(vocab, min_length, max_length)),
        key=lambda c: -c[0],
    )[:beams]
    got = hypotheses(output, 0)
    assert [tokens for _, tokens in got] == [tokens for _, tokens in brute]
    torch.testing.assert_close(torch.tensor([s for s, _ in got]), torch.tensor([s for s, _ in brute]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("num_beams,min_length,max_length,vocab", [(1, 1, 6, 5), (2, 0, 5, 6), (5, 1, 10, 7), (5, 3, 8, 9)])
def test_matches_reference_beam_search(num_beams, min_length, max_length, vocab):
    prompts = [(1,), (0,), (3,)]
    model = ToyModel(vocab, 1 + max_length, seed=vocab)
    output = beam_search(
        model.full_prefix_step, torch.tensor(prompts), num_beams=num_beams, min_length=min_length,
        max_length=max_length, eos_token_id=EOS, num_return_sequences=num_beams, mode="best_first",
    )
    for example, prompt in enumerate(prompts):
        expected = reference_beam_search(model, prompt, num_beams, min_length, max_length)[:num_beams]
        got = hypotheses(output, example)
        assert [tokens for _, tokens in got] == [tokens for _, tokens in expected]
        for score, tokens in got:
            assert score == pytest.approx(model.log_prob(prompt, tokens, min_length) / length_penalty(len(tokens)), abs=1e-6)
            assert EOS not in tokens[:-1] and len(tokens) > min_length


def test_early_stop_keeps_a_hypothesis_that_wins_later():
    model = ConfidentAfterFirst()
    output = beam_search(
        model.full_prefix_step, torch.tensor([[1]]), num_beams=1, min_length=0, max_length=10, eos_token_id=EOS, mode="best_first"
    )
    expected = reference_beam_search(model, (1,), num_beams=1, min_length=0, max_length=10)[0]
    [(score, tokens)] = hypotheses(output, 0)
    assert tokens == expected[1] and len(tokens) > 1
    assert score == pytest.approx(expected[0])


@pytest.mark.parametrize("mode", ["authors", "best_first"])
@pytest.mark.parametrize("num_beams", [1, 3, 5])
def test_cached_step_gives_identical_beams(num_beams, mode):
    model = ToyModel(vocab=11, positions=2 + 12, seed=7)
    prompts = torch.tensor([[1, 4], [5, 0], [3, 3], [9, 10]])
    settings = dict(num_beams=num_beams, min_length=2, max_length=12, eos_token_id=EOS, num_return_sequences=num_beams, mode=mode)
    full = beam_search(model.full_prefix_step, prompts, **settings)
    cached = beam_search(model.cached_step(), prompts, **settings)
    assert torch.equal(full.sequences, cached.sequences)
    assert torch.equal(full.lengths, cached.lengths)
    assert torch.equal(full.scores, cached.scores)


@pytest.mark.parametrize("mode", ["authors", "best_first"])
def test_batch_equals_one_by_one(mode):
    model = ToyModel(vocab=8, positions=1 + 7, seed=3)
    prompts = torch.tensor([[1], [4], [6]])
    settings = dict(num_beams=3, min_length=1, max_length=7, eos_token_id=EOS, num_return_sequences=2, pad_token_id=0, mode=mode)
    together = beam_search(model.full_prefix_step, prompts, **settings)
    for example in range(len(prompts)):
        alone = beam_search(model.full_prefix_step, prompts[example : example + 1], **settings)
        assert hypotheses(alone, 0) == hypotheses(together, example)


def test_length_penalty_is_gnmt():
    assert length_penalty(1) == 1.0
    assert length_penalty(7) == pytest.approx(2.0**0.6)
    assert length_penalty(3, alpha=0.0) == 1.0
    assert math.isclose(length_penalty(25), 5.0**0.6)


def test_prompt_is_not_modified():
    model = ToyModel(vocab=5, positions=1 + 4, seed=0)
    prompts = torch.tensor([[1], [3]])
    before = prompts.clone()
    beam_search(model.full_prefix_step, prompts, num_beams=2, max_length=4, eos_token_id=EOS)
    assert torch.equal(prompts, before)


@pytest.mark.parametrize(
    "prompt,kwargs,message",
    [
        (torch.tensor([1, 2]), {}, "prompt_ids must be a long tensor"),
        (torch.tensor([[1.0]]), {}, "prompt_ids must be a long tensor"),
        (torch.zeros(2, 0, dtype=torch.long), {}, "B, P >= 1"),
        (torch.tensor([[1]]), {"num_beams": 0}, "num_beams"),
        (torch.tensor([[1]]), {"min_length": 5, "max_length": 5}, "min_length"),
        (torch.tensor([[1]]), {"num_return_sequences": 6}, "num_return_sequences"),
        (torch.tensor([[1]]), {"mode": "greedy"}, "mode must be one of"),
    ],
)
def test_bad_arguments(prompt, kwargs, message):
    model = ToyModel(vocab=5, positions=8, seed=0)
    with pytest.raises(ValueError, match=message):
        beam_search(model.full_prefix_step, prompt, eos_token_id=EOS, **kwargs)
