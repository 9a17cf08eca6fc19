"""mPLUG's inference on an MPLUG model: VQA answers and captions by beam search, retrieval scores (ITC top-k re-ranked by ITM).

``MPLUG.vqa_generate`` / ``caption_generate`` / ``retrieval_scores`` call these.
"""
from __future__ import annotations

from functools import partial
from typing import NamedTuple, Optional

import torch

from mplug.model.generation import BeamSearchOutput, DecoderStep, beam_search
from mplug.model.validation import check_finite_rows, check_generation, check_images, text_inputs
from mplug.tasks.pretraining import _check_batches, contrastive_features, encode_images, itm_logits


class RetrievalScores(NamedTuple):
    """itc [Ni, Nt] contrastive similarities; i2t [Ni, Nt] and t2i [Nt, Ni] ITM match logits of each query's
    ITC top-k candidates, -inf elsewhere and in the rows of queries outside this shard (rank by these)."""

    itc: torch.Tensor
    i2t: torch.Tensor
    t2i: torch.Tensor



def _generate(model, memory, memory_masks, prompt_ids, num_beams, use_cache, **search) -> BeamSearchOutput:
    """Beam search (mplug.model.generation.beam_search, ``search`` its settings) of the decoder over ``memory`` from
    prompt_ids [B, P] (default [BOS])."""
    config = model.config
    if prompt_ids is None:
        prompt_ids = torch.full((memory[0].shape[0], 1), config.bos_token_id, dtype=torch.long, device=memory[0].device)
    step = DecoderStep(model.text_decoder, memory, memory_masks, num_beams, use_cache)
    return beam_search(
        step, prompt_ids, num_beams=num_beams, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id, **search
    )


@torch.no_grad()
def vqa_generate(
    model,
    images: torch.Tensor,
    question_ids: torch.Tensor,
    question_mask: torch.Tensor,
    *,
    num_beams: int = 5,
    min_length: int = 1,
    max_length: int = 10,
    num_return_sequences: int = 1,
    use_cache: bool = True,
    prompt_ids: Optional[torch.Tensor] = None,
    mode: str = "authors",
) -> BeamSearchOutput:
    """Answers to questions [B, Lq] about images [B, 3, H, W]: the decoder reads the fused [v; t] -> BeamSearchOutput
    (sequences [B, R, <= max_length] answer ids ending with [SEP]). use_cache=False is the authors' full re-run;
    mode="authors" (their beam search) or "best_first" (mplug.model.generation.beam_search)."""
    check_images("images", images)
    question_ids, question_mask = text_inputs("question_ids", question_ids, "question_mask", question_mask, images.shape[0])
    check_generation(model.config, prompt_ids, num_beams, max_length, num_return_sequences)
    image_embeds, image_mask = encode_images(model, images)
    question_embeds = model.text_encoder(question_ids, question_mask)
    image_out, question_out = model.fusion_encoder(image_embeds, image_mask, question_embeds, question_mask)
    return _generate(
        model, (image_out, question_out), (image_mask, question_mask), prompt_ids, num_beams, use_cache,
        min_length=min_length, max_length=max_length, num_return_sequences=num_return_sequences, mode=mode,
    )


@torch.no_grad()
def caption_generate(
    model,
    images: torch.Tensor,
    *,
    num_beams: int = 5,
    min_length: int = 8,
    max_length: int = 25,
    num_return_sequences: int = 1,
    use_cache: bool = True,
    prompt_ids: Optional[torch.Tensor] = None,
    mode: str = "authors",
) -> BeamSearchOutput:
    """Captions of images [B, 3, H, W]: the decoder reads the vision tokens only -> BeamSearchOutput
    (sequences [B, R, <= max_length]). prompt_ids [B, P] (starting with [CLS]) seed every caption; mode as in
    vqa_generate."""
    check_images("images", images)
    if prompt_ids is not None:
        _check_batches(images, "prompt_ids", prompt_ids)
    check_generation(model.config, prompt_ids, num_beams, max_length, num_return_sequences)
    image_embeds, image_mask = encode_images(model, images)
    return _generate(
        model, (image_embeds,), (image_mask,), prompt_ids, num_beams, use_cache,
        min_length=min_length, max_length=max_length, num_return_sequences=num_return_sequences, mode=mode,
    )


def query_slice(num_queries: int, rank: int, world_size: int) -> range:
    """The queries shard ``rank`` of ``world_size`` re-ranks, as the authors' retrieval_img_mplug.py:138-140 split
    them: step = num_queries // world_size + 1, [rank * step, min(num_queries, rank * step + step))."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank!r}, world_size={world_size!r}")
    step = num_queries // world_size + 1
    return range(min(num_queries, rank * step), min(num_queries, rank * step + step))


@torch.no_grad()
def retrieval_scores(
    model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, *, k: int = 256, batch_size: int = 64,
    shard: tuple = (0, 1),
) -> RetrievalScores:
    """Image-text retrieval over images [Ni, 3, H, W] and texts [Nt, L]: ITC similarities, then each query's top-k
    candidates (k = 256, the authors' k_test) re-ranked by the ITM match logit (pairs fused ``batch_size`` at a
    time) -> RetrievalScores. shard = (rank, world_size): only the queries of query_slice are re-ranked (both ways)."""
    if not isinstance(k, int) or k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive ints, got k={k!r}, batch_size={batch_size!r}")
    check_images("images", images)
    text_ids, text_mask = text_inputs("text_ids", text_ids, "text_mask", text_mask)
    image_embeds = torch.cat([model.visual_encoder(chunk) for chunk in images.split(batch_size)])
    text_embeds = torch.cat(
        [model.text_encoder(ids, mask) for ids, mask in zip(text_ids.split(batch_size), text_mask.split(batch_size))]
    )
    image_feat, text_feat = contrastive_features(model, image_embeds, text_embeds)
    check_finite_rows("images", image_feat)
    check_finite_rows("texts", text_feat)
    itc = image_feat @ text_feat.t()
    match = partial(_match_logits, model, image_embeds, text_embeds, text_mask, batch_size)
    i2t = _rerank(itc, k, match, query_slice(itc.shape[0], *shard))
    t2i = _rerank(itc.t(), k, lambda texts, images: match(images, texts), query_slice(itc.shape[1], *shard))
    return RetrievalScores(itc, i2t, t2i)


def _rerank(similarity: torch.Tensor, k: int, score_pairs, queries: Optional[range] = None) -> torch.Tensor:
    """similarity [Nq, Nc]: each row in ``queries`` (default all) has its top-k columns scored by
    score_pairs(rows, columns) [P]; every other entry is -inf."""
    queries = range(similarity.shape[0]) if queries is None else queries
    k = min(k, similarity.shape[1])
    reranked = torch.full_like(similarity, float("-inf"))
    if not queries:
        return reranked
    columns = similarity[queries.start:queries.stop].topk(k, dim=1).indices
    rows = torch.arange(queries.start, queries.stop, device=similarity.device).repeat_interleave(k)
    scores = score_pairs(rows, columns.flatten()).view(-1, k)
    reranked[queries.start:queries.stop] = reranked[queries.start:queries.stop].scatter(1, columns, scores.to(similarity.dtype))
    return reranked


def _match_logits(model, image_embeds, text_embeds, text_mask, batch_size, image_index, text_index) -> torch.Tensor:
    """ITM match logits [P] of the pairs (image_index[p], text_index[p])."""
    scores = []
    for images, texts in zip(image_index.split(batch_size), text_index.split(batch_size)):
        pair_images = image_embeds[images]
        image_mask = torch.ones(pair_images.shape[:2], dtype=torch.bool, device=pair_images.device)
        scores.append(itm_logits(model, pair_images, image_mask, text_embeds[texts], text_mask[texts])[:, 1])
    return torch.cat(scores)
