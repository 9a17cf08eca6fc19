"""The nocaps reader (mplug.run.data.nocaps) and the caption evaluation's per-domain scores on a tiny generated file in the official nocaps val format
({"images": [{"id", "file_name", "domain"}], "annotations": [{"image_id", "caption"}]}, nocaps.org download)."""
import json

import pytest
from PIL import Image

from mplug.run.data.nocaps import read_nocaps
from mplug.run.data.records import BadRecords


def write(tmp_path, data):
    for name in ("0013ea2087020901.jpg", "00223fe420d16a8e.jpg"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    path = tmp_path / "nocaps_val.json"
    path.write_text(json.dumps(data))
    return str(path)


IMAGES = [{"id": 0, "file_name": "0013ea2087020901.jpg", "domain": "in-domain", "height": 4, "width": 4},
          {"id": 1, "file_name": "00223fe420d16a8e.jpg", "domain": "out-domain", "height": 4, "width": 4}]


def test_val_file_gives_one_sample_per_image_with_its_captions(tmp_path):
    annotations = [{"image_id": 1, "id": 10, "caption": "A red bus."}, {"image_id": 0, "id": 11, "caption": "A cat."},
                   {"image_id": 1, "id": 12, "caption": "a bus on a road"}]
    path = write(tmp_path, {"info": {}, "licenses": [], "images": IMAGES, "annotations": annotations})
    samples = read_nocaps(path, str(tmp_path))
    assert [(s["image_id"], s["domain"], s["references"]) for s in samples] == [
        (0, "in-domain", ["A cat."]), (1, "out-domain", ["A red bus.", "a bus on a road"])]
    assert samples[1]["image"] == str(tmp_path / "00223fe420d16a8e.jpg") and samples[1]["source"] == (path, 1)


def test_test_file_without_annotations_has_no_references(tmp_path):
    samples = read_nocaps(write(tmp_path, {"images": IMAGES}), str(tmp_path))
    assert [s["references"] for s in samples] == [None, None]


def test_bad_entries_are_refused_or_skipped(tmp_path):
    images = IMAGES + [{"id": 2, "file_name": "missing.jpg"}]
    path = write(tmp_path, {"images": images, "annotations": [{"image_id": 0, "caption": "a cat"},
                                                             {"image_id": 1, "caption": "a bus"},
                                                             {"image_id": 2, "caption": "x"}]})
    with pytest.raises(ValueError, match=r"nocaps_val.json: images: record 2: image .*missing.jpg does not exist"):
        read_nocaps(path, str(tmp_path))
    bad = BadRecords(skip=True)
    assert [s["image_id"] for s in read_nocaps(path, str(tmp_path), bad)] == [0, 1] and len(bad.reasons) == 1
    no_caption = write(tmp_path, {"images": IMAGES, "annotations": [{"image_id": 0, "caption": "a cat"}]})
    with pytest.raises(ValueError, match="images: record 1: image id 1 has no caption"):
        read_nocaps(no_caption, str(tmp_path))
    with pytest.raises(ValueError, match="JSON object with an 'images' list"):
        read_nocaps(write(tmp_path, [IMAGES]), str(tmp_path))


def nocaps_run(tmp_path):
    """A tiny caption config and checkpoint, and a nocaps val file over its three test images, one per domain."""
    from test_evaluate import tiny_checkpoint
    from tiny_dataset import write_tiny_dataset

    config = write_tiny_dataset(tmp_path / "data", "caption", n=3)
    images = [{"id": 7 - i, "file_name": f"img_{i}.png", "domain": domain}
              for i, domain in enumerate(("out-domain", "in-domain", "near-domain"))]
    annotations = [{"image_id": 7 - i, "caption": f"caption {i} {k}"} for i in range(3) for k in range(2)]
    val = tmp_path / "nocaps_val.json"
    val.write_text(json.dumps({"images": images, "annotations": annotations}))
    test = tmp_path / "nocaps_test.json"
    test.write_text(json.dumps({"images": images}))
    return config, tiny_checkpoint(config, "caption"), val, test


def test_caption_evaluation_on_a_nocaps_file_scores_each_domain(tmp_path, monkeypatch):
    from mplug.run import caption_eval
    from test_evaluate import run_cli

    config, checkpoint, val, test = nocaps_run(tmp_path)
    root = f"--set=image_root={tmp_path / 'data' / 'coco' / 'val2014'}"
    scored = []  # the java COCO evaluation itself is tested in test_evaluate.py / test_caption_eval.py
    monkeypatch.setattr(caption_eval, "unavailable_reason", lambda: None)
    monkeypatch.setattr(caption_eval, "coco_caption_scores", lambda c, r: scored.append((list(c), list(r))) or {"CIDEr": len(c)})
    scores = run_cli("caption", config, checkpoint, tmp_path / "val", f"--set=test_file={val}", root)
    results = json.loads((tmp_path / "val" / "caption_result.json").read_text())
    assert [entry["image_id"] for entry in results] == [7, 6, 5]
    captions = {entry["image_id"]: entry["caption"] for entry in results}
    refs = {7 - i: [f"caption {i} 0", f"caption {i} 1"] for i in range(3)}
    assert scored == [([captions[6]], [refs[6]]), ([captions[5]], [refs[5]]), ([captions[7]], [refs[7]]),
                      ([captions[7], captions[6], captions[5]], [refs[7], refs[6], refs[5]])]
    assert {key: scores[key] for key in ("in-domain", "near-domain", "out-domain", "overall")} == {
        "in-domain": {"images": 1, "CIDEr": 1}, "near-domain": {"images": 1, "CIDEr": 1},
        "out-domain": {"images": 1, "CIDEr": 1}, "overall": {"images": 3, "CIDEr": 3}}
    scores = run_cli("caption", config, checkpoint, tmp_path / "test", f"--set=test_file={test}", root)
    assert "no annotations" in scores["caption_metrics_skipped"] and scores["images"] == 3
    assert [entry["image_id"] for entry in json.loads((tmp_path / "test" / "caption_result.json").read_text())] == [7, 6, 5]
