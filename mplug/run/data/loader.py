"""Distributed sampling that can resume inside an epoch, and the DataLoader of a TaskDataset."""
from __future__ import annotations

from typing import Iterator, Tuple

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableDistributedSampler(DistributedSampler):
    """A DistributedSampler (shuffled by (seed, epoch); each of num_replicas ranks takes every num_replicas-th index)
    that can start ``skip(n)`` samples into this rank's share of the epoch, to resume a run. ``set_epoch`` clears the
    skip, so call it first. pad=False (evaluation) gives each index to exactly one rank (shares may differ by one)
    instead of repeating indices to even them out."""

    def __init__(self, dataset, num_replicas: int, rank: int, shuffle: bool = True, seed: int = 0, pad: bool = True):
        if not isinstance(num_replicas, int) or num_replicas < 1 or not isinstance(rank, int) or not 0 <= rank < num_replicas:
            raise ValueError(f"need num_replicas >= 1 and 0 <= rank < num_replicas, got num_replicas={num_replicas!r}, rank={rank!r}")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.pad, self.skipped = pad, 0

    def set_epoch(self, epoch: int) -> None:
        """Sample epoch's order from its start."""
        super().set_epoch(epoch)
        self.skipped = 0

    def skip(self, num_samples_per_replica: int) -> None:
        """Start this epoch after the first num_samples_per_replica samples of this rank's share."""
        share = self._share_length()
        if not isinstance(num_samples_per_replica, int) or not 0 <= num_samples_per_replica <= share:
            raise ValueError(f"skip must be an int in [0, {share}] (this rank's samples per epoch), got {num_samples_per_replica!r}")
        self.skipped = num_samples_per_replica

    def _share_length(self) -> int:
        if self.pad:
            return self.num_samples
        return len(range(self.rank, len(self.dataset), self.num_replicas))

    def __iter__(self) -> Iterator[int]:
        if self.pad:
            indices = list(super().__iter__())
        else:
            order = torch.randperm(len(self.dataset), generator=torch.Generator().manual_seed(self.seed + self.epoch)) \
                if self.shuffle else torch.arange(len(self.dataset))
            indices = order[self.rank::self.num_replicas].tolist()
        return iter(indices[self.skipped:])

    def __len__(self) -> int:
        return self._share_length() - self.skipped


def build_loader(dataset, cfg: dict, *, train: bool, rank: int, world_size: int) -> Tuple[DataLoader, ResumableDistributedSampler]:
    """(DataLoader, its sampler) of a TaskDataset: train shuffles by cfg["seed"] and drops the last partial batch
    (batch_size_train); test keeps the order and each sample once (batch_size_test); cfg["num_workers"] workers,
    pinned memory where CUDA exists."""
    sampler = ResumableDistributedSampler(dataset, world_size, rank, shuffle=train, seed=cfg["seed"], pad=train)
    loader = DataLoader(
        dataset, batch_size=cfg["batch_size_train" if train else "batch_size_test"], sampler=sampler,
        num_workers=cfg["num_workers"], collate_fn=dataset.collate, pin_memory=torch.cuda.is_available(), drop_last=train,
    )
    return loader, sampler
