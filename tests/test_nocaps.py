"""The nocaps reader (mplug.run.data.nocaps) on a tiny generated file in the official nocaps val format
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
