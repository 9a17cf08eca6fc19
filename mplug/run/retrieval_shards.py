"""Retrieval evaluation sharded over the job's processes as the authors' retrieval_img_mplug.py evaluation(): every
process embeds all images and texts, re-ranks its slice of the queries by ITM (mplug.tasks.inference.query_slice),
and the score matrices are combined over processes (their all_reduce, :176-179)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mplug.tasks.inference import RetrievalScores


def job_shard() -> tuple:
    """(rank, world size) of this process in the initialised torch.distributed job, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def sharded_retrieval_scores(model, images: torch.Tensor, text_ids: torch.Tensor, text_mask: torch.Tensor, *, k: int,
                             batch_size: int) -> RetrievalScores:
    """model.retrieval_scores with this process's queries re-ranked, then i2t and t2i combined by an element-wise max
    all-reduce: each query's row is filled by one process and -inf on the others, so every process ends with the
    one-process matrices (the authors sum rows pre-filled with -100 instead, which shifts every row by the same amount)."""
    rank, world_size = job_shard()
    scores = model.retrieval_scores(images, text_ids, text_mask, k=k, batch_size=batch_size, shard=(rank, world_size))
    if world_size > 1:
        for matrix in (scores.i2t, scores.t2i):
            dist.all_reduce(matrix, op=dist.ReduceOp.MAX)
    return scores
