"""mPLUG's fine-tuning objectives on an MPLUG model: VQA over weighted answer lists, caption cross-entropy and
self-critical sequence training (SCST) rewarded by CIDEr-D, image-text retrieval (ITC + ITM by image id).

``MPLUG.vqa_loss`` / ``caption_loss`` / ``caption_scst_loss`` / ``retrieval_loss`` call these.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mplug.tasks.cider import CiderD
from mplug.model.generation import DecoderStep
from mplug.tasks.objectives import IGNORE_INDEX, upcast
from mplug.tasks.inference import _generate
from mplug.tasks.pretraining import _check_batches, encode_images, pretrain_losses, token_loss

BASELINES = ("greedy", "mean")
SAMPLINGS = ("sample", "beam")


def vqa_answer_weights(answer_lists: Sequence[Sequence[str]], dataset: str = "vqa") -> Tuple[List[str], List[float], List[int]]:
    """Each question's annotated answers -> (distinct answers, their weights, answers per question), as the
    authors' reader weighs them: "vqa" (VQA v2) count / number of annotations, "vg" (Visual Genome, GQA) 0.5 each."""
    if dataset not in ("vqa", "vg"):
        raise ValueError(f"dataset must be 'vqa' or 'vg', got {dataset!r}")
    answers, weights, counts = [], [], []
    for index, annotations in enumerate(answer_lists):
        if not annotations:
            raise ValueError(f"answer_lists[{index}] is empty; every question needs at least one answer")
        distinct = Counter(annotations)
        answers += list(distinct)
        weights += [count / len(annotations) if dataset == "vqa" else 0.5 for count in distinct.values()]
        counts.append(len(distinct))
    return answers, weights, counts


def _answer_counts(answers_per_question, batch: int, answers: int, device) -> torch.Tensor:
    """answers_per_question (ints or a long tensor [B], each >= 1, summing to the answers) -> long [B]."""
    counts = torch.as_tensor(answers_per_question, dtype=torch.long, device=device).flatten()
    if counts.numel() != batch:
        raise ValueError(f"answers_per_question has {counts.numel()} entries but there are {batch} questions")
    if bool((counts < 1).any()):
        raise ValueError(f"answers_per_question must be >= 1 (an empty answer list has nothing to learn), got {counts.tolist()}")
    if int(counts.sum()) != answers:
        raise ValueError(f"answers_per_question sums to {int(counts.sum())} but answer_ids has {answers} answers")
    return counts


def sequence_log_probs(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over t >= 1 of log p(ids[:, t]) under logits [N, L, V] (position t - 1 predicts token t), where mask [N, L]
    -> [N]."""
    labels = ids[:, 1:].masked_fill(~mask[:, 1:], IGNORE_INDEX)
    losses = F.cross_entropy(upcast(logits[:, :-1]).flatten(0, 1), labels.flatten(), reduction="none")
    return -losses.view(labels.shape).sum(1)


def vqa_loss(model, images, question_ids, question_mask, answer_ids, answer_mask, weights, answers_per_question) -> torch.Tensor:
    """VQA fine-tuning: images [B, 3, H, W], questions [B, Lq] (bool mask), answers [N, La] "[CLS] a.. [SEP]" (bool
    mask), weights [N], answers_per_question [B] (question b owns the next answers_per_question[b] answers) -> scalar:
    each answer's summed token loss on its question's fused [v; t], weighted, summed, divided by B."""
    _check_batches(images, "question_ids", question_ids)
    counts = _answer_counts(answers_per_question, question_ids.shape[0], answer_ids.shape[0], question_ids.device)
    weights = torch.as_tensor(weights, device=answer_ids.device)
    if weights.shape != answer_ids.shape[:1] or not weights.is_floating_point():
        raise ValueError(
            f"weights must be floats [N] = [{answer_ids.shape[0]}] (one per answer), "
            f"got shape {tuple(weights.shape)}, dtype {weights.dtype}"
        )
    image_embeds, image_mask = encode_images(model, images)
    question_embeds = model.text_encoder(question_ids, question_mask)
    image_out, question_out = model.fusion_encoder(image_embeds, image_mask, question_embeds, question_mask)
    memory = (image_out.repeat_interleave(counts, 0), question_out.repeat_interleave(counts, 0))
    memory_masks = (image_mask.repeat_interleave(counts, 0), question_mask.repeat_interleave(counts, 0))
    logits = model.text_decoder(answer_ids, answer_mask, memory=memory, memory_masks=memory_masks)
    answer_losses = -sequence_log_probs(logits, answer_ids, answer_mask)
    return (weights.to(answer_losses.dtype) * answer_losses).sum() / images.shape[0]


def caption_loss(model, images, caption_ids, caption_mask, prompt_length: int = 0) -> torch.Tensor:
    """Caption cross-entropy: images [B, 3, H, W], captions [B, L] "[CLS] prompt.. words.. [SEP]" (bool mask) ->
    mean token loss (over every process's tokens) of the decoder reading the vision tokens; the first
    ``prompt_length`` tokens after [CLS] (the prompt, e.g. "a picture of") are not predicted."""
    _check_batches(images, "caption_ids", caption_ids)
    if not isinstance(prompt_length, int) or not 0 <= prompt_length < caption_ids.shape[1] - 1:
        raise ValueError(f"prompt_length must be an int in [0, {caption_ids.shape[1] - 1}), got {prompt_length!r}")
    image_embeds, image_mask = encode_images(model, images)
    logits = model.text_decoder(caption_ids, caption_mask, memory=(image_embeds,), memory_masks=(image_mask,))
    labels = caption_ids[:, 1:].masked_fill(~caption_mask[:, 1:], IGNORE_INDEX)
    labels[:, :prompt_length] = IGNORE_INDEX
    return token_loss(logits[:, :-1], labels)


@torch.no_grad()
def sample_captions(model, memory, memory_masks, num_samples: int, min_length: int, max_length: int, generator=None):
    """num_samples captions per image drawn token by token from the decoder over memory (sources [B, L_i, hidden]),
    the end token banned before min_length -> (ids [B, K, <= max_length], pad after the end token; lengths [B, K])."""
    config = model.config
    rows = memory[0].shape[0] * num_samples
    step = DecoderStep(model.text_decoder, memory, memory_masks, num_samples, use_cache=True)
    sequences = torch.full((rows, 1), config.bos_token_id, dtype=torch.long, device=memory[0].device)
    done = torch.zeros(rows, dtype=torch.bool, device=sequences.device)
    lengths = torch.full((rows,), max_length, dtype=torch.long, device=sequences.device)
    parents = None
    for position in range(max_length):
        probs = torch.softmax(upcast(step(sequences, parents)), dim=-1)
        if position < min_length:
            probs[:, config.eos_token_id] = 0.0
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1).masked_fill(done, config.pad_token_id)
        ended = ~done & (tokens == config.eos_token_id)
        lengths[ended] = position + 1
        done |= ended
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        parents = torch.arange(rows, device=sequences.device)
        if bool(done.all()):
            break
    return sequences[:, 1:].view(-1, num_samples, sequences.shape[1] - 1), lengths.view(-1, num_samples)


def _captions(sequences: torch.Tensor, lengths: torch.Tensor, eos_token_id: int) -> List[List[List[int]]]:
    """Generated ids [B, K, T] with lengths [B, K] -> each caption's words: its ids before the first end token."""
    captions = []
    for row, row_lengths in zip(sequences.tolist(), lengths.tolist()):
        words = [ids[:length] for ids, length in zip(row, row_lengths)]
        captions.append([ids[: ids.index(eos_token_id)] if eos_token_id in ids else ids for ids in words])
    return captions


def caption_scst_loss(
    model,
    images: torch.Tensor,
    references: Sequence[Sequence[Sequence[int]]],
    cider: CiderD,
    *,
    num_samples: int = 5,
    baseline: str = "greedy",
    sampling: str = "sample",
    min_length: int = 8,
    max_length: int = 25,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Self-critical sequence training: images [B, 3, H, W], references[b] the token-id sequences (no [CLS]/[SEP])
    of image b's captions, cider a CiderD with the training references' document frequencies -> (loss, rewards
    [B, K]). K = num_samples captions per image are drawn (sampling "sample") or are the top beams ("beam"); each
    earns CIDEr-D minus a baseline (the greedy caption's CIDEr-D, or the mean over the K); loss = -mean(advantage *
    log p(caption up to its end token))."""
    _check_scst_args(images, references, cider, num_samples, baseline, sampling)
    config = model.config
    image_embeds, image_mask = encode_images(model, images)
    memory, masks = (image_embeds.detach(),), (image_mask,)
    search = dict(min_length=min_length, max_length=max_length)
    with torch.no_grad():
        if sampling == "sample":
            samples, lengths = sample_captions(model, memory, masks, num_samples, min_length, max_length, generator)
        else:
            beams = _generate(model, memory, masks, None, num_samples, True, num_return_sequences=num_samples, **search)
            samples, lengths = beams.sequences, beams.lengths
        greedy = _generate(model, memory, masks, None, 1, True, **search) if baseline == "greedy" else None
    captions = _captions(samples, lengths, config.eos_token_id)
    rewards = _cider_scores(cider, captions, references, images.device)
    if greedy is None:
        base = rewards.mean(1, keepdim=True)
    else:
        base = _cider_scores(cider, _captions(greedy.sequences, greedy.lengths, config.eos_token_id), references, images.device)
    ids, mask = _scst_inputs(captions, config, images.device)
    repeated = (image_embeds.repeat_interleave(num_samples, 0),), (image_mask.repeat_interleave(num_samples, 0),)
    logits = model.text_decoder(ids, mask, memory=repeated[0], memory_masks=repeated[1])
    log_probs = sequence_log_probs(logits, ids, mask).view(-1, num_samples)
    advantage = (rewards - base).to(log_probs.dtype)
    return -(advantage * log_probs).mean(), rewards


def _cider_scores(cider: CiderD, captions, references, device) -> torch.Tensor:
    """CIDEr-D of captions[b][k] (word ids) against references[b] -> float64 [B, K]."""
    scores = [[cider.score(caption, references[b]) for caption in row] for b, row in enumerate(captions)]
    return torch.tensor(scores, dtype=torch.float64, device=device)


def _scst_inputs(captions, config, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Captions (word-id lists, [B][K]) -> decoder ids "[CLS] words [SEP]" [B * K, L] and bool mask, right-padded."""
    rows = [[config.bos_token_id, *words, config.eos_token_id] for row in captions for words in row]
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), config.pad_token_id, dtype=torch.long, device=device)
    mask = torch.zeros((len(rows), width), dtype=torch.bool, device=device)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, device=device)
        mask[index, : len(row)] = True
    return ids, mask


def _check_scst_args(images, references, cider, num_samples, baseline, sampling) -> None:
    batch = images.shape[0] if isinstance(images, torch.Tensor) and images.dim() else None
    if references is None or len(references) != batch:
        got = None if references is None else len(references)
        raise ValueError(f"references must hold one list of reference captions per image ({batch}), got {got}")
    empty = [b for b, refs in enumerate(references) if not refs]
    if empty:
        raise ValueError(f"references: images {empty} have no reference captions; SCST needs at least one per image")
    if not isinstance(cider, CiderD):
        raise TypeError(f"cider must be an mplug.tasks.cider.CiderD built from the training references, got {type(cider).__name__}")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    if baseline not in BASELINES or sampling not in SAMPLINGS:
        raise ValueError(f"baseline must be one of {BASELINES} and sampling one of {SAMPLINGS}, got {baseline!r}, {sampling!r}")


def retrieval_loss(model, images, text_ids, text_mask, image_ids, **kw) -> Dict[str, torch.Tensor]:
    """Retrieval fine-tuning: {"itc", "itm"} of images [B, 3, H, W] and texts [B, L] where captions of one image id
    (image_ids long [B]) are all positives (pretrain_losses' ITC + ITM with image_ids; kw: distill, alpha, ...)."""
    if image_ids is None:
        raise ValueError("image_ids is required: captions of the same image id are the retrieval positives")
    return pretrain_losses(model, images, text_ids, text_mask, objectives=("itc", "itm"), image_ids=image_ids, **kw)
