"""nocaps scoring of ``python -m mplug.run.evaluate --task caption`` when the test_file is a nocaps annotation file
(mplug.run.data.nocaps): caption_result.json = [{"image_id", "caption"}] (the nocaps server's submission format) and,
where the file has annotations (the val split), the COCO caption metrics (mplug.run.caption_eval) per domain as nocaps
reports them: "in-domain", "near-domain", "out-domain" and "overall" (each over its images alone, CIDEr's document
frequencies from that subset's references), each {"images": n, metric: value}. The test split has no references: the
results are written and the metrics skipped with that reason.
"""
from __future__ import annotations

from typing import Dict, List

from mplug.run import caption_eval

DOMAINS = ("in-domain", "near-domain", "out-domain")


def is_nocaps(dataset) -> bool:
    """Whether a caption test set was read from a nocaps file (its samples carry "domain")."""
    return getattr(dataset, "task", None) == "caption" and bool(dataset.samples) and "domain" in dataset.samples[0]


def _scores(rows: List[dict]) -> Dict[str, float]:
    captions, references = [row["caption"] for row in rows], [row["references"] for row in rows]
    return {"images": len(rows), **caption_eval.coco_caption_scores(captions, references)}


def nocaps_outputs(rows: List[dict], samples: List[dict]):
    """(caption_result.json entries, metrics) of nocaps rows {"image_id", "caption", "references"}; samples (the data
    set's) give each image id its domain."""
    seen = set()
    for row in rows:
        if row["image_id"] in seen:
            raise ValueError(f"the nocaps test set holds image_id {row['image_id']!r} more than once")
        seen.add(row["image_id"])
    results = [{"image_id": row["image_id"], "caption": row["caption"]} for row in rows]
    scores = {"images": len(rows)}
    if any(row["references"] is None for row in rows):
        reason = "the nocaps file has no annotations (the test split): submit caption_result.json to the nocaps server"
        return results, {**scores, "caption_metrics_skipped": reason}
    reason = caption_eval.unavailable_reason()
    if reason is not None:
        return results, {**scores, "caption_metrics_skipped": reason}
    domain = {sample["image_id"]: sample["domain"] for sample in samples}
    for name in DOMAINS:
        subset = [row for row in rows if domain[row["image_id"]] == name]
        if subset:
            scores[name] = _scores(subset)
    scores["overall"] = _scores(rows)
    return results, scores
