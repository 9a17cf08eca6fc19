"""A tiny synthetic data set per task in the authors' annotation formats (PNG images of coloured shapes, the JSON
files, a BERT-layout vocab.txt and a config.yaml for the tiny model) for the train/evaluate tests."""
from __future__ import annotations

import json
import random
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square")
COUNTS = ("one", "two", "three")
# The other words of the questions and captions below.
WORDS = ("a", "an", "picture", "of", "on", "background", "image", "with", "what", "color", "is", "the", "shape",
         "how", "many", "shapes", "are", "there", "in", "this", "yes", "no", "and", "small", "big", "crimson", "circles", "squares",
         "left", "right", "both", "images", "show")
# Contraction pieces for the answer-decoding test, appended after the words above so their ids stay as they were.
CONTRACTION_PIECES = ("'", "don", "t", "it", "s")
TASKS = ("vqa", "caption", "retrieval", "pretrain", "ve", "nlvr", "grounding")


def write_vocab(path: Path) -> Path:
    """A vocab.txt with BERT's special-token ids ([PAD] 0, [UNK] 100, [CLS] 101, [SEP] 102, [MASK] 103) then the words."""
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += sorted(set(COLORS) | set(SHAPES) | set(COUNTS) | set(WORDS))
    tokens += CONTRACTION_PIECES
    path.write_text("\n".join(tokens) + "\n")
    return path


def draw_image(path: Path, rng: random.Random) -> dict:
    """A 40x48 PNG of one to three shapes of one colour on a noisy background -> its facts (color, shape, count)."""
    color, shape, count = rng.choice(sorted(COLORS)), rng.choice(SHAPES), rng.randrange(1, 4)
    image = Image.new("RGB", (48, 40), tuple(rng.randrange(0, 80) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y = rng.randrange(48), rng.randrange(40)
        draw.point((x, y), fill=tuple(rng.randrange(0, 120) for _ in range(3)))
    for k in range(count):
        box = (2 + 15 * k, 8 + rng.randrange(8), 14 + 15 * k, 20 + rng.randrange(8))
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return {"color": color, "shape": shape, "count": COUNTS[count - 1]}


def captions_of(facts: dict) -> list:
    """Two raw captions (with capitals and punctuation, as in COCO) of an image."""
    return [f"A picture of {facts['count']} {facts['color']} {facts['shape']}s.",
            f"An image with {facts['color']} {facts['shape']}s on the background!"]


def _images(root: Path, folder: str, n: int, rng: random.Random) -> list:
    return [(f"img_{i}.png", draw_image(root / folder / f"img_{i}.png", rng)) for i in range(n)]


def _vqa(root: Path, n: int, rng: random.Random) -> dict:
    vqa_images, vg_images = _images(root, "coco", n, rng), _images(root, "vg", n, rng)
    train = []
    for i in range(n):
        name, facts = vqa_images[i]
        annotated = [facts["color"]] * 3 + [rng.choice(sorted(COLORS))]
        train.append({"image": name, "question": "What color is the shape?", "answer": annotated, "dataset": "vqa"})
        name, facts = vg_images[i]
        train.append({"image": name, "question": "How many shapes are there?", "answer": facts["count"], "dataset": "vg"})
    test = [{"image": name, "question": f"What shape is in this {'image' if i % 2 else 'picture'}?", "question_id": 1000 + i,
             "answer": [facts["shape"]] * 9 + ["crimson"], "dataset": "vqa"} for i, (name, facts) in enumerate(vqa_images)]
    answers = sorted(set(COLORS) | set(SHAPES) | set(COUNTS) | {"yes", "no"})
    _dump(root / "vqa_train.json", train)
    _dump(root / "vqa_test.json", test)
    _dump(root / "answer_list.json", answers)
    return {"train_file": ["vqa_train.json"], "test_file": "vqa_test.json", "answer_list": "answer_list.json",
            "vqa_root": "coco", "vg_root": "vg", "gqa_root": "coco"}


def _caption(root: Path, n: int, rng: random.Random) -> dict:
    for split, folder in (("train", "train2014"), ("test", "val2014")):
        records = [{"filename": name, "filepath": folder, "sentences": [{"raw": c} for c in captions_of(facts)],
                    "split": split} for name, facts in _images(root / "coco", folder, n, rng)]
        _dump(root / f"caption_{split}.json", records)
    return {"train_file": "caption_train.json", "test_file": "caption_test.json", "image_root": "coco"}


def _retrieval(root: Path, n: int, rng: random.Random) -> dict:
    images = _images(root, "images", n, rng)
    train = [{"image": f"images/{name}", "caption": caption, "image_id": f"coco_{i}"}
             for i, (name, facts) in enumerate(images[: max(n // 2, 2)]) for caption in captions_of(facts)]
    test = [{"image": f"images/{name}", "caption": captions_of(facts)} for name, facts in images]
    _dump(root / "retrieval_train.json", train[:n])
    _dump(root / "retrieval_test.json", test)
    return {"train_file": "retrieval_train.json", "test_file": "retrieval_test.json", "image_root": "."}


def _pretrain(root: Path, n: int, rng: random.Random) -> dict:
    records = [{"image": f"images/{name}", "caption": captions_of(facts) if i % 2 else captions_of(facts)[0]}
               for i, (name, facts) in enumerate(_images(root, "images", n, rng))]
    _dump(root / "pretrain.json", records)
    return {"train_file": ["pretrain.json"], "image_root": "."}


def _ve(root: Path, n: int, rng: random.Random) -> dict:
    images = _images(root, "flickr", n, rng)
    sentences = {"entailment": "the image shows {color} {shape}s", "neutral": "the image shows big {color} {shape}s",
                 "contradiction": "the image shows crimson {other}s"}
    records = []
    for i, (name, facts) in enumerate(images):
        label = sorted(sentences)[i % 3]
        other = SHAPES[1 - SHAPES.index(facts["shape"])]
        records.append({"image": name, "sentence": sentences[label].format(other=other, **facts), "label": label})
    _dump(root / "ve_train.json", records)
    _dump(root / "ve_test.json", records[::-1])
    return {"train_file": "ve_train.json", "test_file": "ve_test.json", "image_root": "flickr"}


def _nlvr(root: Path, n: int, rng: random.Random) -> dict:
    images = _images(root, "nlvr", 2 * n, rng)
    records = []
    for i in range(n):
        (left, left_facts), (right, right_facts) = images[2 * i], images[2 * i + 1]
        label = left_facts["color"] == right_facts["color"]
        records.append({"images": [left, right], "sentence": f"both images show {left_facts['color']} shapes",
                        "label": str(label) if i % 2 else label})
    _dump(root / "nlvr_train.json", records)
    _dump(root / "nlvr_test.json", records[::-1])
    return {"train_file": "nlvr_train.json", "test_file": "nlvr_test.json", "image_root": "nlvr"}


def _grounding(root: Path, n: int, rng: random.Random) -> dict:
    """Images of one shape each; the record's bbox [x, y, w, h] in pixels is the shape's box."""
    records = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        x, y, w, h = rng.randrange(0, 24), rng.randrange(0, 20), rng.randrange(8, 24), rng.randrange(8, 20)
        image = Image.new("RGB", (48, 40), tuple(rng.randrange(0, 80) for _ in range(3)))
        (ImageDraw.Draw(image).ellipse if shape == "circle" else ImageDraw.Draw(image).rectangle)((x, y, x + w, y + h), fill=COLORS[color])
        (root / "refcoco").mkdir(parents=True, exist_ok=True)
        image.save(root / "refcoco" / f"img_{i}.png")
        key = "text" if i % 2 else "sentence"
        records.append({"image": f"img_{i}.png", key: f"the {color} {shape}", "bbox": [x, y, w, h]})
    _dump(root / "grounding_train.json", records)
    _dump(root / "grounding_test.json", records[::-1])
    return {"train_file": "grounding_train.json", "test_file": "grounding_test.json", "image_root": "refcoco"}


def _dump(path: Path, records) -> None:
    path.write_text(json.dumps(records, indent=1))


def write_tiny_dataset(root: Path, task: str, n: int = 8, seed: int = 0) -> Path:
    """Write n generated records of ``task`` (train and test files where the task has them) under root, with
    vocab.txt and config.yaml (model tiny, image_size 32, batch 2, 1 epoch, paths relative to root) -> the config path."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{task}:{seed}")
    writers = {"vqa": _vqa, "caption": _caption, "retrieval": _retrieval, "pretrain": _pretrain, "ve": _ve, "nlvr": _nlvr,
               "grounding": _grounding}
    paths = writers[task](root, n, rng)
    write_vocab(root / "vocab.txt")
    config = {
        "task": task, "model": "tiny", "image_size": 32, "seed": seed, "epochs": 1, "batch_size_train": 2,
        "batch_size_test": 2, "num_workers": 0, "log_every": 1, "max_words": 12, "max_tokens": 16,
        "answer_max_words": 3, "num_beams": 2, "min_length": 1, "max_length": 5, "k_test": 4,
        "optimizer": {"lr": 1.0e-3, "lr_visual": 1.0e-3, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 0, "min_lr": 1.0e-5},
        "vocab": "vocab.txt", **paths,
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path
