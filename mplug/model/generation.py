"""Beam search over a decoder step function, with mPLUG's settings (beam 5, start 101, end 102, GNMT length penalty).

Two searches, both over a step function ``step(sequences, parents) -> logits``, so each runs the cached decoder (feed
the new token, reorder the cache by ``parents``) and the authors' baseline (re-run the prefix): mode="authors" is the
released mPLUG's search (the default of vqa_generate and caption_generate), mode="best_first" keeps finished
hypotheses apart and searches on until none can still win.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from mplug.model.validation import check_positive_int
from mplug_kernels.profiling import nvtx_annotate

StepFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
"""(sequences [N, P + t] so far, parents [N] row each row continues, None at the first step) -> logits [N, V]."""


@dataclass
class BeamSearchOutput:
    """sequences [B, R, T] generated ids (end token included, then pad), scores [B, R] best first, lengths [B, R]."""

    sequences: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


def length_penalty(length: int, alpha: float = 0.6) -> float:
    """GNMT length penalty ((5 + length) / 6) ** alpha; a hypothesis scores sum(log p) / penalty."""
    return ((5.0 + length) / 6.0) ** alpha


class _Finished:
    """The best ``size`` finished hypotheses of each example: scores [B, size] (-inf = empty slot), tokens, lengths."""

    def __init__(self, batch: int, size: int, max_length: int, pad_token_id: int, device: torch.device):
        self.scores = torch.full((batch, size), float("-inf"), device=device)
        self.tokens = torch.full((batch, size, max_length), pad_token_id, dtype=torch.long, device=device)
        self.lengths = torch.zeros((batch, size), dtype=torch.long, device=device)

    def add(self, scores: torch.Tensor, tokens: torch.Tensor, length: int, open_examples: torch.Tensor) -> None:
        """Merge candidates (scores [B, C], tokens [B, C, max_length], all of ``length``) into examples still open."""
        scores = scores.masked_fill(~open_examples[:, None], float("-inf"))
        lengths = torch.full_like(scores, length, dtype=torch.long)
        merged = torch.cat([self.scores, scores], dim=1)
        self.scores, order = merged.topk(self.scores.shape[1], dim=1)
        self.tokens = _take_rows(torch.cat([self.tokens, tokens], dim=1), order)
        self.lengths = torch.cat([self.lengths, lengths], dim=1).gather(1, order)

    def full(self) -> torch.Tensor:
        """[B] bool: every slot holds a hypothesis."""
        return torch.isfinite(self.scores[:, -1])

    def best(self, count: int) -> BeamSearchOutput:
        """The ``count`` best hypotheses of every example, trimmed to the longest."""
        lengths = self.lengths[:, :count]
        longest = max(int(lengths.max()), 1)
        return BeamSearchOutput(self.tokens[:, :count, :longest], self.scores[:, :count], lengths)


def _take_rows(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens [B, K, T] gathered along K by index [B, C] -> [B, C, T]."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def _extend(tokens: torch.Tensor, beams: torch.Tensor, new_tokens: torch.Tensor, position: int) -> torch.Tensor:
    """Copies of the parent hypotheses tokens[b, beams[b, c]] with new_tokens [B, C] written at ``position``."""
    extended = _take_rows(tokens, beams).clone()
    extended[..., position] = new_tokens
    return extended


def _check_search_args(prompt_ids, num_beams, min_length, max_length, num_return_sequences) -> None:
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        got = f"shape {tuple(prompt_ids.shape)}, dtype {prompt_ids.dtype}" if isinstance(prompt_ids, torch.Tensor) else type(prompt_ids).__name__
        raise ValueError(f"prompt_ids must be a long tensor [B, P] with P >= 1, got {got}")
    if prompt_ids.shape[0] == 0 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be [B, P] with B, P >= 1, got shape {tuple(prompt_ids.shape)}")
    check_positive_int("num_beams", num_beams)
    if not 0 <= min_length < max_length:
        raise ValueError(f"need 0 <= min_length < max_length, got min_length={min_length}, max_length={max_length}")
    if not 1 <= num_return_sequences <= num_beams:
        raise ValueError(f"num_return_sequences must be in [1, num_beams={num_beams}], got {num_return_sequences}")


MODES = ("authors", "best_first")


def beam_search(
    step: StepFn,
    prompt_ids: torch.Tensor,
    *,
    num_beams: int = 5,
    min_length: int = 1,
    max_length: int = 10,
    eos_token_id: int = 102,
    pad_token_id: int = 0,
    alpha: float = 0.6,
    num_return_sequences: int = 1,
    mode: str = "authors",
) -> BeamSearchOutput:
    """Beam search from prompt_ids [B, P] (e.g. [[101]] * B) for 1..max_length new tokens -> BeamSearchOutput.

    mode="authors" (the released mPLUG's search, default): see ``authors_beam_search``. mode="best_first": finished
    hypotheses kept apart from the open beams, searched on until none can still win (see ``best_first_beam_search``).
    """
    _check_search_args(prompt_ids, num_beams, min_length, max_length, num_return_sequences)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    search = authors_beam_search if mode == "authors" else best_first_beam_search
    return search(
        step, prompt_ids, num_beams=num_beams, min_length=min_length, max_length=max_length,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, alpha=alpha, num_return_sequences=num_return_sequences,
    )


def authors_beam_search(
    step: StepFn, prompt_ids: torch.Tensor, *, num_beams, min_length, max_length, eos_token_id, pad_token_id, alpha,
    num_return_sequences,
) -> BeamSearchOutput:
    """The released mPLUG's beam search over prompt_ids [B, P] -> BeamSearchOutput (sequences [B, R, <= max_length]).

    At step t (t = 1.. tokens out) every beam x vocab candidate scores cum log p / ((5 + t) / 6) ** alpha, the end
    token included (-1e20 added to it before min_length tokens); the top num_beams become the beams, each keeping
    score x penalty as its cum log p. A beam whose new token is the end token is recorded as a hypothesis and stays
    a beam (it keeps being extended). An example stops when its top beam's new token is the end token, or at
    max_length: then every beam is recorded. Its records, best score first (ties in recording order), are returned;
    a record may hold tokens after an end token, exactly as the authors' search returns it.
    """
    batch, device = prompt_ids.shape[0], prompt_ids.device
    live = torch.full((batch, num_beams), float("-inf"), device=device)
    live[:, 0] = 0.0
    tokens = torch.full((batch, num_beams, max_length), pad_token_id, dtype=torch.long, device=device)
    first_row = torch.arange(batch, device=device)[:, None] * num_beams
    records = [[] for _ in range(batch)]
    open_examples = [True] * batch
    sequences, parents = prompt_ids.repeat_interleave(num_beams, dim=0), None
    for position in range(max_length):
        logits = step(sequences, parents)
        log_probs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
        log_probs = log_probs.view(batch, num_beams, -1)
        vocab = log_probs.shape[-1]
        if position < min_length:  # out of place, so the search can run with gradients (SCST, mplug.tasks.scst)
            ban = torch.zeros(vocab, dtype=log_probs.dtype, device=device)
            ban[eos_token_id] = -1e20
            log_probs = log_probs + ban
        penalty = length_penalty(position + 1, alpha)
        scores, chosen = ((live[..., None] + log_probs) / penalty).view(batch, -1).topk(num_beams, dim=1)
        live = scores * penalty
        beams, new_tokens = chosen // vocab, chosen % vocab
        tokens = _extend(tokens, beams, new_tokens, position)
        ending = new_tokens == eos_token_id
        ending = ending | ending[:, :1] | (position == max_length - 1)
        _record(records, open_examples, scores, tokens, ending, position + 1)
        if not any(open_examples):
            break
        parents = (first_row + beams).flatten()
        sequences = torch.cat([sequences[parents], new_tokens.reshape(-1, 1)], dim=1)
    return _best_records(records, num_return_sequences, pad_token_id, device)


def _record(records, open_examples, scores, tokens, ending, length: int) -> None:
    """Append (score, tokens [length]) of the ending beams [B, K] of every open example; close examples whose top beam ended."""
    for example, beam in ending.nonzero().tolist():
        if open_examples[example]:
            records[example].append((scores[example, beam], tokens[example, beam, :length]))
    for example, top_ended in enumerate(ending[:, 0].tolist()):
        open_examples[example] = open_examples[example] and not top_ended


def _best_records(records, count: int, pad_token_id: int, device) -> BeamSearchOutput:
    """The ``count`` best records of every example (stable sort by score, best first) as a BeamSearchOutput."""
    best = [sorted(example, key=lambda record: float(record[0].detach()), reverse=True)[:count] for example in records]
    longest = max(len(tokens) for example in best for _, tokens in example)
    sequences = torch.full((len(best), count, longest), pad_token_id, dtype=torch.long, device=device)
    for example, hypotheses in enumerate(best):
        for rank, (_, tokens) in enumerate(hypotheses):
            sequences[example, rank, : len(tokens)] = tokens
    scores = torch.stack([torch.stack([score for score, _ in example]) for example in best])
    lengths = torch.tensor([[len(tokens) for _, tokens in example] for example in best], dtype=torch.long, device=device)
    return BeamSearchOutput(sequences, scores, lengths)


def best_first_beam_search(
    step: StepFn, prompt_ids: torch.Tensor, *, num_beams, min_length, max_length, eos_token_id, pad_token_id, alpha,
    num_return_sequences,
) -> BeamSearchOutput:
    """Beam search over prompt_ids [B, P] keeping finished hypotheses apart from the open beams -> BeamSearchOutput.

    The end token is banned until ``min_length`` tokens are out; at ``max_length`` every beam ends. Every beam's
    end-token extension is offered to the finished set (score = sum log p / length_penalty(tokens incl. end)); an
    example stops once its finished set is full and no open beam can still beat it (an exact bound, so stopping
    early never changes the result).
    """
    batch, device = prompt_ids.shape[0], prompt_ids.device
    finished = _Finished(batch, num_beams, max_length, pad_token_id, device)
    alive_scores = torch.full((batch, num_beams), float("-inf"), device=device)
    alive_scores[:, 0] = 0.0
    alive_tokens = torch.full((batch, num_beams, max_length), pad_token_id, dtype=torch.long, device=device)
    first_row = torch.arange(batch, device=device)[:, None] * num_beams
    open_examples = torch.ones(batch, dtype=torch.bool, device=device)
    sequences, parents = prompt_ids.repeat_interleave(num_beams, dim=0), None
    for position in range(max_length):
        logits = step(sequences, parents)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        log_probs = torch.log_softmax(logits, dim=-1).view(batch, num_beams, -1)
        vocab = log_probs.shape[-1]
        if position < min_length:
            log_probs[..., eos_token_id] = float("-inf")
        extended = alive_scores[..., None] + log_probs
        if position == max_length - 1:
            ending_scores, ending = extended.view(batch, -1).topk(num_beams, dim=1)
        else:
            ending_scores = extended[..., eos_token_id]
            ending = torch.arange(num_beams, device=device).expand(batch, -1) * vocab + eos_token_id
        ending_tokens = _extend(alive_tokens, ending // vocab, ending % vocab, position)
        finished.add(ending_scores / length_penalty(position + 1, alpha), ending_tokens, position + 1, open_examples)
        if position == max_length - 1:
            break
        extended[..., eos_token_id] = float("-inf")
        alive_scores, chosen = extended.view(batch, -1).topk(num_beams, dim=1)
        beams, new_tokens = chosen // vocab, chosen % vocab
        alive_tokens = _extend(alive_tokens, beams, new_tokens, position)
        best_possible = alive_scores[:, 0] / length_penalty(max_length, alpha)
        open_examples &= ~(finished.full() & (best_possible <= finished.scores[:, -1]))
        if not open_examples.any():
            break
        parents = (first_row + beams).flatten()
        sequences = torch.cat([sequences[parents], new_tokens.reshape(-1, 1)], dim=1)
    return finished.best(num_return_sequences)


class DecoderStep:
    """A beam_search step over ``text_decoder``. With ``use_cache`` the memory's cross-attention K/V are computed once
    per image (then copied to its beams), each step feeds only the new token and the cache follows ``parents``;
    without, every step re-runs the whole prefix over the memory repeated per beam (the authors' baseline)."""

    def __init__(self, decoder, memory: Sequence[torch.Tensor], memory_masks: Sequence[torch.Tensor], num_beams: int, use_cache: bool):
        self.decoder = decoder
        self.use_cache = use_cache
        if use_cache:
            beam_rows = torch.arange(memory[0].shape[0], device=memory[0].device).repeat_interleave(num_beams)
            self.cache = decoder.memory_cache(memory, memory_masks).reorder(beam_rows)
        else:
            self.memory = tuple(states.repeat_interleave(num_beams, dim=0) for states in memory)
            self.memory_masks = tuple(mask.repeat_interleave(num_beams, dim=0) for mask in memory_masks)

    @nvtx_annotate("decoder.step")
    def __call__(self, sequences: torch.Tensor, parents: Optional[torch.Tensor]) -> torch.Tensor:
        """sequences [N, T] so far, parents [N] or None -> next-token logits [N, V]."""
        if not self.use_cache:
            everything = torch.ones_like(sequences, dtype=torch.bool)
            return self.decoder(sequences, everything, memory=self.memory, memory_masks=self.memory_masks)[:, -1]
        if parents is not None:
            self.cache.reorder(parents, memory=False)
            sequences = sequences[:, -1:]
        everything = torch.ones_like(sequences, dtype=torch.bool)
        logits, self.cache = self.decoder(sequences, everything, cache=self.cache, use_cache=True)
        return logits[:, -1]
