"""Video on an MPLUG model (the paper's zero-shot video transfer): every frame through the ViT in one batched pass,
the frame tokens concatenated into one vision memory (Lv = T x tokens per frame) with a key padding mask for missing
frames, then fusion, the decoder (video QA, video captioning) and retrieval scores as for images.

``MPLUG.encode_video`` / ``video_qa_generate`` / ``video_caption_generate`` / ``video_retrieval_scores`` call these.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from mplug.model.generation import BeamSearchOutput
from mplug.tasks.finetune import sequence_log_probs
from mplug.tasks.inference import RetrievalScores, _generate, _rerank
from mplug.tasks.objectives import upcast
from mplug.tasks.pretraining import itm_logits
from mplug.model.validation import check_generation, describe


def default_mask(ids: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """mask, or all True shaped like ids [B, L] when None (the text encoder checks both)."""
    return torch.ones(ids.shape, dtype=torch.bool, device=ids.device) if mask is None and isinstance(ids, torch.Tensor) else mask


class VideoMemory(NamedTuple):
    """embeds [B, T * Lf, hidden] (frame t's tokens at [t * Lf, (t + 1) * Lf)), mask bool [B, T * Lf] (False =
    a missing frame's token), frame_mask bool [B, T]."""

    embeds: torch.Tensor
    mask: torch.Tensor
    frame_mask: torch.Tensor


def check_frames(frames, frame_mask) -> torch.Tensor:
    """frames float [B, T, 3, S, S] with B, T >= 1; frame_mask bool [B, T] (None = all present) keeping >= 1 frame
    per video -> the bool frame mask."""
    if not isinstance(frames, torch.Tensor) or not frames.is_floating_point() or frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be a float tensor [B, T, 3, S, S], got {describe(frames)}")
    if frames.shape[0] == 0 or frames.shape[1] == 0:
        raise ValueError(f"frames must hold at least one video of at least one frame (B >= 1, T >= 1), got {describe(frames)}")
    if frame_mask is None:
        return torch.ones(frames.shape[:2], dtype=torch.bool, device=frames.device)
    if not isinstance(frame_mask, torch.Tensor) or frame_mask.dtype != torch.bool or frame_mask.shape != frames.shape[:2]:
        raise ValueError(f"frame_mask must be a bool tensor [B, T] = {list(frames.shape[:2])} (or None), got {describe(frame_mask)}")
    empty = (~frame_mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"frame_mask: videos {empty} have no frame; every video needs at least one")
    return frame_mask.to(frames.device)


def encode_video(model, frames: torch.Tensor, frame_mask: Optional[torch.Tensor] = None) -> VideoMemory:
    """frames [B, T, 3, S, S] (frame_mask bool [B, T], None = all present) -> VideoMemory: the present frames run
    through the visual encoder as one batch; a missing frame's tokens are zeros and masked out."""
    frame_mask = check_frames(frames, frame_mask)
    batch, num_frames = frame_mask.shape
    present = model.visual_encoder(frames[frame_mask])
    tokens_per_frame = present.shape[1]
    embeds = present.new_zeros(batch, num_frames, tokens_per_frame, present.shape[2])
    embeds = embeds.index_put((frame_mask,), present)
    mask = frame_mask.repeat_interleave(tokens_per_frame, dim=1)
    return VideoMemory(embeds.flatten(1, 2), mask, frame_mask)


def encode_videos_in_chunks(model, frames: torch.Tensor, frame_mask: Optional[torch.Tensor], chunk: int) -> VideoMemory:
    """encode_video of frames [N, T, 3, S, S] run chunk videos at a time (bounded visual-encoder activations), the
    chunks' VideoMemory concatenated."""
    frame_mask = check_frames(frames, frame_mask)
    parts = [encode_video(model, f, m) for f, m in zip(frames.split(chunk), frame_mask.split(chunk))]
    return VideoMemory(*(torch.cat(field) for field in zip(*parts)))


def video_features(model, video: VideoMemory) -> torch.Tensor:
    """Normalised ITC features [B, E] of videos: vision_proj of the mean [CLS] state of their present frames."""
    batch, num_frames = video.frame_mask.shape
    cls = video.embeds.view(batch, num_frames, -1, video.embeds.shape[-1])[:, :, 0]
    weights = video.frame_mask.to(cls.dtype)
    mean_cls = (cls * weights[..., None]).sum(1) / weights.sum(1, keepdim=True)
    return F.normalize(model.vision_proj(mean_cls), dim=-1)


def _check_batch(frames: torch.Tensor, name: str, ids) -> None:
    check_frames(frames, None)
    if isinstance(ids, torch.Tensor) and ids.dim() and ids.shape[0] != frames.shape[0]:
        raise ValueError(f"frames has {frames.shape[0]} videos but {name} ({describe(ids)}) has {ids.shape[0]} rows; they must match")


@torch.no_grad()
def video_qa_generate(model, frames, question_ids, question_mask=None, frame_mask=None, *, num_beams: int = 5,
                      min_length: int = 1, max_length: int = 10, num_return_sequences: int = 1, use_cache: bool = True,
                      mode: str = "authors") -> BeamSearchOutput:
    """Answers to questions [B, Lq] about videos [B, T, 3, S, S]: the decoder reads the fused [video; question]
    (the search as in MPLUG.vqa_generate) -> BeamSearchOutput."""
    question_mask = default_mask(question_ids, question_mask)
    _check_batch(frames, "question_ids", question_ids)
    check_generation(model.config, None, num_beams, max_length, num_return_sequences)
    video = encode_video(model, frames, frame_mask)
    question_embeds = model.text_encoder(question_ids, question_mask)
    video_out, question_out = model.fusion_encoder(video.embeds, video.mask, question_embeds, question_mask)
    return _generate(
        model, (video_out, question_out), (video.mask, question_mask), None, num_beams, use_cache,
        min_length=min_length, max_length=max_length, num_return_sequences=num_return_sequences, mode=mode,
    )


class RankedAnswers(NamedTuple):
    """ids long [B, k]: answer-list indices, best first; probs [B, k]: their softmax over the k re-scored answers."""

    ids: torch.Tensor
    probs: torch.Tensor


@torch.no_grad()
def rank_answers(model, memory, memory_masks, answer_ids, answer_mask, k: int = 128) -> RankedAnswers:
    """Rank a fixed answer list [N, La] ("[CLS] answer.. [SEP]", bool mask) for each question's decoder memory (sources
    [B, L_i, hidden]) as the authors' rank_answer (model_vqa_mplug.py:185-242): the k answers whose first token is
    likeliest after [CLS], each re-scored log p(first token) + its summed token log-probabilities (which count the
    first token again, as theirs do), softmax over the k -> RankedAnswers (k capped at N)."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    batch, k = memory[0].shape[0], min(k, answer_ids.shape[0])
    start = answer_ids[:1, :1].expand(batch, 1)
    first_logits = model.text_decoder(start, torch.ones_like(start, dtype=torch.bool), memory=memory, memory_masks=memory_masks)
    first_probs = torch.softmax(upcast(first_logits[:, 0]), dim=-1)[:, answer_ids[:, 1]]
    top_probs, top_ids = first_probs.topk(k, dim=1)
    ids, mask = answer_ids[top_ids.flatten()], answer_mask[top_ids.flatten()]
    tiled = tuple(source.repeat_interleave(k, 0) for source in memory)
    tiled_masks = tuple(source_mask.repeat_interleave(k, 0) for source_mask in memory_masks)
    logits = model.text_decoder(ids, mask, memory=tiled, memory_masks=tiled_masks)
    scores = top_probs.log() + sequence_log_probs(logits, ids, mask).view(batch, k).to(top_probs.dtype)
    probs, order = torch.softmax(scores, dim=-1).topk(k, dim=1)
    return RankedAnswers(top_ids.gather(1, order), probs)


@torch.no_grad()
def video_qa_rank(model, frames, question_ids, question_mask, answer_ids, answer_mask, frame_mask=None, *,
                  k: int = 128) -> RankedAnswers:
    """Video QA as the authors evaluate it (videoqa_mplug.py:45-70, k_test 128): the fused [video; question] of each
    question ranks the answer list (rank_answers); the answer is ids[:, 0]."""
    question_mask = default_mask(question_ids, question_mask)
    _check_batch(frames, "question_ids", question_ids)
    video = encode_video(model, frames, frame_mask)
    question_embeds = model.text_encoder(question_ids, question_mask)
    video_out, question_out = model.fusion_encoder(video.embeds, video.mask, question_embeds, question_mask)
    return rank_answers(model, (video_out, question_out), (video.mask, question_mask), answer_ids, answer_mask, k)


def answer_list_inputs(tokenizer, answers):
    """The answer list tokenised as videoqa_mplug.py:39-40 does: each answer + "[SEP]" -> (ids, bool mask) [N, La]."""
    encoded = tokenizer([answer + "[SEP]" for answer in answers], padding="longest", return_tensors="pt")
    return encoded["input_ids"], encoded["attention_mask"].bool()


def vatex_caption(text: str) -> str:
    """A decoded video caption as their VATEX evaluation writes it: stripped, " ." appended (videocap_mplug.py:59)."""
    return text.strip() + " ."


@torch.no_grad()
def video_caption_generate(model, frames, frame_mask=None, *, prompt_ids=None, num_beams: int = 5, min_length: int = 8,
                           max_length: int = 25, num_return_sequences: int = 1, use_cache: bool = True,
                           mode: str = "authors") -> BeamSearchOutput:
    """Captions of videos [B, T, 3, S, S]: the decoder reads the frame tokens only (as MPLUG.caption_generate);
    prompt_ids [B, P] ("[CLS] a picture of", VATEX's prompt, videocap_mplug.py:46) start every caption."""
    check_generation(model.config, prompt_ids, num_beams, max_length, num_return_sequences)
    video = encode_video(model, frames, frame_mask)
    return _generate(
        model, (video.embeds,), (video.mask,), prompt_ids, num_beams, use_cache,
        min_length=min_length, max_length=max_length, num_return_sequences=num_return_sequences, mode=mode,
    )


@torch.no_grad()
def video_retrieval_scores(model, frames, text_ids, text_mask=None, frame_mask=None, *, k: int = 128,
                           batch_size: int = 16) -> RetrievalScores:
    """Text-video retrieval over videos [Nv, T, 3, S, S] and texts [Nt, L]: ITC similarities of video_features and
    the text [CLS] features, then each query's top-k candidates (k_test 128) re-ranked by ITM match logit + ITC
    similarity, as retrieval_vid_mplug.py:97,117 score them -> RetrievalScores. Videos are encoded batch_size at a
    time."""
    if not isinstance(k, int) or k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive ints, got k={k!r}, batch_size={batch_size!r}")
    text_mask = default_mask(text_ids, text_mask)
    video = encode_videos_in_chunks(model, frames, frame_mask, batch_size)
    text_embeds = model.text_encoder(text_ids, text_mask)
    text_feat = F.normalize(model.text_proj(text_embeds[:, 0]), dim=-1)
    itc = video_features(model, video) @ text_feat.t()

    def match(video_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        pairs = zip(video_index.split(batch_size), text_index.split(batch_size))
        itm = torch.cat([
            itm_logits(model, video.embeds[v], video.mask[v], text_embeds[t], text_mask[t])[:, 1] for v, t in pairs
        ])
        return itm + itc[video_index, text_index].to(itm.dtype)

    return RetrievalScores(itc, _rerank(itc, k, match), _rerank(itc.t(), k, lambda texts, videos: match(videos, texts)))

