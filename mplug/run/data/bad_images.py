"""Records whose image cannot be used (mplug.run.data.images.BadImage: it does not decode, or it is over
max_image_pixels) under --skip-bad-records: the data set returns a marker item for them (``bad_item``), its collate
drops those items from the batch (``batch["dropped"]``: {"position", "index", "reason"} each; ``batch["inputs"]`` is
None when no item is left), and the training and evaluation loops count the distinct records (``SkippedImages``).
Decoding is a function of the file alone, so a resumed run drops the same items from the same batches."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

BAD = "bad_image"  # the key that marks an item as a record whose image could not be used


def bad_item(index: int, reason: str) -> Dict:
    """The item the data set returns for sample ``index`` whose image could not be used (``reason`` names the file,
    the record and the image)."""
    return {BAD: reason, "index": index}


def split_items(items: List[Dict]) -> Tuple[List[Dict], List[Dict]]:
    """A batch's items -> (the usable items, {"position", "index", "reason"} of each dropped one)."""
    kept = [item for item in items if BAD not in item]
    dropped = [{"position": position, "index": item["index"], "reason": item[BAD]}
               for position, item in enumerate(items) if BAD in item]
    return kept, dropped


def with_placeholders(rows: List[Dict], batch: Dict) -> List[Dict]:
    """A test batch's result rows (one per usable item) with {"skipped": reason} put back at the dropped items'
    positions, so every rank keeps one row per sample of its share (the ranks' rows interleave into data set order)."""
    rows = list(rows)
    for drop in batch.get("dropped", []):
        rows.insert(drop["position"], {"skipped": drop["reason"]})
    return rows


def without_placeholders(rows: List[Dict]) -> Tuple[List[Dict], List[str]]:
    """Gathered rows -> (the result rows, the reasons of the skipped records)."""
    return [row for row in rows if "skipped" not in row], [row["skipped"] for row in rows if "skipped" in row]


class SkippedImages:
    """The distinct records whose image could not be used, over the batches a process reads."""

    def __init__(self, skip: bool):
        self.skip = skip
        self.reasons: Dict[str, None] = {}

    def add(self, batch: Dict) -> None:
        """Count the batch's dropped items."""
        for drop in batch.get("dropped", []):
            self.reasons.setdefault(drop["reason"])

    def empty_on_any_rank(self, batch: Dict, device) -> bool:
        """Whether this batch, or the same step's batch of another rank, has no usable item (the same answer on
        every rank, so all of them skip the step together: DDP and FSDP need every rank in each step); device is
        where the process group reduces (CUDA for NCCL)."""
        if not self.skip:
            return False
        empty = torch.tensor([float(batch["inputs"] is None)], device=device)
        if dist.is_initialized():
            dist.all_reduce(empty, op=dist.ReduceOp.MAX)
        return bool(empty.item())

    def all_ranks(self) -> List[str]:
        """The reasons of every rank (each record once, in first-seen order); call on every rank."""
        reasons = list(self.reasons)
        if self.skip and dist.is_initialized():
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, reasons)
            reasons = [reason for part in gathered for reason in part]
        return list(dict.fromkeys(reasons))
