"""mPLUG's pretraining objectives as plain functions: ITC with feature queues, ITM hard negatives, MLM masking,
the PrefixLM split, and a token mean that stays exact under DistributedDataParallel."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class _GatherBatch(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every process's gradient for our rows (all_reduce, then slice).
    (torch.distributed.nn's all_gather, deprecated, did not reproduce the one-process gradients under gloo.)"""

    @staticmethod
    def forward(ctx, features: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(features) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, features.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        rows = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * rows : (dist.get_rank() + 1) * rows]


def gather_batch(features: torch.Tensor) -> Tuple[torch.Tensor, int]:
    """[B, E] from every process, concatenated in rank order (gradients flow back) -> ([W * B, E], offset of ours)."""
    if not _distributed():
        return features, 0
    return _GatherBatch.apply(features), dist.get_rank() * features.shape[0]


def bank_batch(features: torch.Tensor, bank: str = "local") -> Tuple[torch.Tensor, int]:
    """The batch rows of an ITC bank -> (rows, offset of ours): "local" this process's [B, E] (the authors',
    models/model_retrieval_mplug.py:48,52), "global" every process's (gather_batch)."""
    if bank not in ("local", "global"):
        raise ValueError(f"the ITC bank must be 'local' or 'global', got {bank!r}")
    return gather_batch(features) if bank == "global" else (features, 0)


def global_token_mean(token_losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of token_losses over labels != -100 across all processes, scaled so DDP's gradient averaging gives the
    gradient of the mean over the combined batch (plain mean in one process)."""
    counted = labels != IGNORE_INDEX
    total = token_losses[counted].sum()
    count = counted.sum()
    if not _distributed():
        return total / count.clamp(min=1)
    count = count.clone()
    dist.all_reduce(count)
    return total * dist.get_world_size() / count.clamp(min=1)


def itc_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temp: torch.Tensor,
    image_queue: Optional[torch.Tensor] = None,
    text_queue: Optional[torch.Tensor] = None,
    bank: str = "local",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss of normalised image_feat, text_feat [B, E] against the batch (this process's, or
    with bank="global" every process's) and the queues [E, Q] -> (loss, sim_i2t [B, B_all + Q], sim_t2i [B, B_all +
    Q]); positives are the diagonal."""
    all_image, offset = bank_batch(image_feat, bank)
    all_text, _ = bank_batch(text_feat, bank)
    image_bank, text_bank = feature_bank(all_image, image_queue), feature_bank(all_text, text_queue)
    targets = contrastive_targets(image_feat.shape[0], offset, image_bank.shape[1], image_feat.device)
    return contrastive_loss(image_feat, text_feat, image_bank, text_bank, temp, targets, targets)


def feature_bank(batch_feat: torch.Tensor, queue: Optional[torch.Tensor]) -> torch.Tensor:
    """[B_all, E] features and an optional queue [E, Q] -> the bank [E, B_all + Q] (the queue detached)."""
    if queue is None:
        return batch_feat.t()
    return torch.cat([batch_feat.t(), queue.detach().to(batch_feat.dtype)], dim=1)


@torch.no_grad()
def contrastive_targets(
    batch: int, offset: int, bank_size: int, device, ids: Optional[torch.Tensor] = None, bank_ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """ITC targets [B, bank_size]: one-hot on our own pair (column offset + b), or with ids [B] and bank_ids
    [bank_size] an equal share on every bank entry with the row's id (the authors' retrieval targets)."""
    if ids is None:
        return torch.zeros(batch, bank_size, device=device).scatter_(1, (torch.arange(batch, device=device) + offset)[:, None], 1.0)
    positives = (ids[:, None] == bank_ids[None, :]).float()
    return positives / positives.sum(1, keepdim=True)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-sum_j targets[..., j] * log_softmax(logits)[..., j] -> [...] (cross-entropy against a distribution)."""
    return -(torch.log_softmax(upcast(logits), dim=-1) * targets).sum(-1)


def contrastive_loss(image_feat, text_feat, image_bank, text_bank, temp, targets_i2t, targets_t2i):
    """Mean soft cross-entropy of image_feat [B, E] against text_bank [E, N] and text_feat against image_bank, over
    temp, with targets [B, N] per direction -> (loss, sim_i2t [B, N], sim_t2i [B, N])."""
    sim_i2t = image_feat @ text_bank / temp
    sim_t2i = text_feat @ image_bank / temp
    loss = (soft_cross_entropy(sim_i2t, targets_i2t).mean() + soft_cross_entropy(sim_t2i, targets_t2i).mean()) / 2
    return loss, sim_i2t, sim_t2i


@torch.no_grad()
def distilled_targets(momentum_similarity: torch.Tensor, targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * softmax(momentum_similarity) + (1 - alpha) * targets, both [B, N] (momentum distillation)."""
    return alpha * torch.softmax(upcast(momentum_similarity), dim=1) + (1.0 - alpha) * targets


@torch.no_grad()
def enqueue(
    image_queue: torch.Tensor, text_queue: torch.Tensor, queue_ptr: torch.Tensor, image_feat, text_feat,
    idx_queue: Optional[torch.Tensor] = None, ids: Optional[torch.Tensor] = None,
) -> None:
    """Write the features [B, E] of every process into the queue buffers [E, Q] at queue_ptr (wrapping), in place;
    with idx_queue [1, Q] also their ids [B] (-1 when ids is None). Pairs with a non-finite image or text feature
    are skipped (a RuntimeWarning gives their count), so one bad batch cannot poison the queues."""
    image_feat, _ = gather_batch(image_feat.detach())
    text_feat, _ = gather_batch(text_feat.detach())
    if ids is not None:
        ids = gather_batch(ids)[0]
    image_feat, text_feat, ids = _finite_pairs(image_feat, text_feat, ids)
    size = image_queue.shape[1]
    slots = (int(queue_ptr) + torch.arange(image_feat.shape[0], device=image_queue.device)) % size
    image_queue[:, slots] = image_feat.t().to(image_queue.dtype)
    text_queue[:, slots] = text_feat.t().to(text_queue.dtype)
    if idx_queue is not None:
        ids = torch.full(image_feat.shape[:1], -1, dtype=torch.long, device=idx_queue.device) if ids is None else ids
        idx_queue[0, slots] = ids
    queue_ptr.fill_((int(queue_ptr) + image_feat.shape[0]) % size)


def _finite_pairs(image_feat: torch.Tensor, text_feat: torch.Tensor, ids: Optional[torch.Tensor]):
    """(image_feat, text_feat, ids) without the rows where either feature [N, E] holds NaN or inf, with a warning."""
    finite = torch.isfinite(image_feat).all(dim=1) & torch.isfinite(text_feat).all(dim=1)
    if bool(finite.all()):
        return image_feat, text_feat, ids
    warnings.warn(f"ITC queues: {int((~finite).sum())} image-text pair(s) with non-finite features not enqueued",
                  RuntimeWarning, stacklevel=4)
    return image_feat[finite], text_feat[finite], None if ids is None else ids[finite]


@torch.no_grad()
def sample_hard_negatives(
    similarity: torch.Tensor, generator: Optional[torch.Generator] = None, ids: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """For each row of similarity [B, B] a column drawn with probability softmax(row), never itself nor (with
    ids [B]) a column of the same id -> long [B]."""
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1] or similarity.shape[0] < 2:
        raise ValueError(f"hard negatives need a square [B, B] similarity with B >= 2, got shape {tuple(similarity.shape)}")
    weights = torch.softmax(upcast(similarity), dim=1)
    weights.fill_diagonal_(0.0)
    if ids is not None:
        weights.masked_fill_(ids[:, None] == ids[None, :], 0.0)
        alone = (weights.sum(1) == 0).nonzero().flatten().tolist()
        if alone:
            raise ValueError(f"image_ids: rows {alone} share their id with the whole batch; ITM needs a negative per row")
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    vocab_size: int,
    mask_token_id: int,
    special_ids: Sequence[int],
    probability: float = 0.15,
    generator: Optional[torch.Generator] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of ids [B, L]: each attended non-special token is picked with ``probability`` (a row with such
    tokens but no pick gets its lowest-drawn one, so no row is left without a label); picked ones become [MASK] (80%),
    a random token (10%) or stay (10%) -> (masked ids [B, L], labels [B, L], -100 where not picked)."""
    if not 0.0 < probability < 1.0:
        raise ValueError(f"mlm probability must be in (0, 1), got {probability}")
    draws = torch.rand((3,) + tuple(input_ids.shape), generator=generator, device=input_ids.device)
    candidates = attention_mask & ~torch.isin(input_ids, torch.tensor(list(special_ids), device=input_ids.device))
    picked = candidates & (draws[0] < probability)
    unpicked_rows = candidates.any(1) & ~picked.any(1)
    first_draw = draws[0].masked_fill(~candidates, 2.0).argmin(1, keepdim=True)
    picked = picked | (torch.zeros_like(picked).scatter(1, first_draw, True) & unpicked_rows[:, None])
    labels = input_ids.masked_fill(~picked, IGNORE_INDEX)
    to_mask = picked & (draws[1] < 0.8)
    to_random = picked & ~to_mask & (draws[2] < 0.5)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=input_ids.device)
    masked = input_ids.masked_fill(to_mask, mask_token_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def random_prefix_lengths(text_mask: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """For texts [CLS] w_1..w_n [SEP] (mask [B, L]) a prefix length s uniform in [0, n - 1] -> long [B]."""
    words = (text_mask.sum(1) - 2).clamp(min=1)
    draws = torch.rand(words.shape, generator=generator, device=text_mask.device)
    return (draws * words).long()


def prefix_split(
    text_ids: torch.Tensor,
    text_mask: torch.Tensor,
    prefix_lengths: torch.Tensor,
    *,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split texts [CLS] w_1..w_n [SEP] ([B, L]) after s = prefix_lengths words -> (prefix ids [CLS] w_1..w_s [SEP]
    and mask [B, 2 + max s], decoder input [BOS] w_s+1..w_n and mask [B, 1 + max(n - s)], labels w_s+1..w_n [EOS])."""
    words = text_mask.sum(1) - 2
    if bool((prefix_lengths < 0).any() | (prefix_lengths >= words.clamp(min=1)).any()):
        raise ValueError(f"prefix_lengths must be in [0, words - 1] per text; words {words.tolist()}, got {prefix_lengths.tolist()}")
    targets = words - prefix_lengths
    prefix_ids, prefix_mask = _pad_column(*_window(text_ids, torch.zeros_like(words), prefix_lengths + 1, pad_token_id), pad_token_id)
    end = (prefix_lengths + 1)[:, None]
    prefix_ids = prefix_ids.scatter(1, end, text_ids.gather(1, (words + 1)[:, None]))
    prefix_mask = prefix_mask.scatter(1, end, True)
    body_ids, body_mask = _window(text_ids, prefix_lengths + 1, targets, pad_token_id)
    decoder_ids = torch.cat([torch.full_like(body_ids[:, :1], bos_token_id), body_ids], dim=1)
    decoder_mask = torch.cat([torch.ones_like(body_mask[:, :1]), body_mask], dim=1)
    labels, _ = _window(text_ids, prefix_lengths + 1, targets, IGNORE_INDEX)
    labels, _ = _pad_column(labels, body_mask, IGNORE_INDEX)
    labels = labels.scatter(1, targets[:, None], eos_token_id)
    return prefix_ids, prefix_mask, decoder_ids, decoder_mask, labels


def _window(ids: torch.Tensor, starts: torch.Tensor, counts: torch.Tensor, fill: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row b's ids[b, starts[b] : starts[b] + counts[b]] left-aligned in [B, max count], ``fill`` after -> (ids, mask)."""
    width = max(int(counts.max()), 1)
    columns = torch.arange(width, device=ids.device)[None, :]
    inside = columns < counts[:, None]
    index = (starts[:, None] + columns).clamp(max=ids.shape[1] - 1)
    return ids.gather(1, index).masked_fill(~inside, fill), inside


def _pad_column(ids: torch.Tensor, mask: torch.Tensor, fill: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """One more column of ``fill`` (mask False) on the right of ids, mask [B, L]."""
    return F.pad(ids, (0, 1), value=fill), F.pad(mask, (0, 1), value=False)
