"""Issue 24, reproducing the authors' numbers: each test against a hand-worked example from the authors' AliceMind
mPLUG/ code (the file and line named at the test)."""
import json
from pathlib import Path

import torch

from mplug.run import evaluate
from mplug.run.data.augment import nlvr_swap
from mplug.run.data.text import load_tokenizer
from mplug.tasks.classification import VE_LABELS
from tiny_dataset import write_tiny_dataset, write_vocab


def test_vqa_answers_decode_contractions_as_the_authors_tokenizer(tmp_path):
    # vqa_mplug.py:117: tokenizer.decode(ids) (transformers 4.14.1, requirements.txt: clean_up_tokenization_spaces
    # True) then [SEP]/[CLS]/[PAD] removed and stripped. By hand: [CLS] don ' t [SEP] -> "[CLS] don't [SEP]" -> "don't".
    tokenizer = load_tokenizer(write_vocab(tmp_path / "vocab.txt"))
    rows = [tokenizer(text)["input_ids"] for text in ("don't", "it's red", "yes")]
    width = max(map(len, rows))
    ids = torch.tensor([row + [0] * (width - len(row)) for row in rows])
    assert evaluate.decode(tokenizer, ids, tokenizer.sep_token_id) == ["don't", "it's red", "yes"]


def _dataset(tmp_path, task, split="train", n=6, edit=None):
    """The tiny ``task`` data set's ``split`` as mplug.run.data builds it (``edit(root)`` run on the files first)."""
    from mplug.run.data import build_dataset
    from mplug.run.run_config import load_config

    config = write_tiny_dataset(tmp_path, task, n=n)
    if edit is not None:
        edit(tmp_path)
    cfg = load_config(str(config))
    return build_dataset(task, split, cfg, load_tokenizer(tmp_path / "vocab.txt"))


def test_ve_labels_in_the_authors_order_and_their_image_ids_without_jpg(tmp_path):
    # dataset/ve_dataset.py:14: {'entailment': 2, 'neutral': 1, 'contradiction': 0}; :24 image_root/'%s.jpg' % image.
    def authors_json(root):
        records = json.loads((root / "ve_train.json").read_text())
        for record in records:
            stem = record["image"].rsplit(".", 1)[0]
            (root / "flickr" / record["image"]).rename(root / "flickr" / f"{stem}.jpg")
            record["image"] = stem
        (root / "ve_train.json").write_text(json.dumps(records))
        return records

    records = []
    dataset = _dataset(tmp_path, "ve", edit=lambda root: records.extend(authors_json(root)))
    assert VE_LABELS.index("entailment") == 2 and VE_LABELS.index("neutral") == 1 and VE_LABELS.index("contradiction") == 0
    authors = {"entailment": 2, "neutral": 1, "contradiction": 0}
    assert [s["label"] for s in dataset.samples] == [authors[r["label"]] for r in records]
    assert [Path(s["image"]).name for s in dataset.samples] == [f"{r['image']}.jpg" for r in records]


def test_nlvr_swap_exchanges_images_and_left_right_words():
    # dataset/nlvr_dataset.py:45-66, by hand: a draw < 0.5 returns (image1, image0) and "left" <-> "right"; else as is.
    images = torch.arange(2.0).view(2, 1)

    class Draw:
        def __init__(self, value):
            self.value = value

        def random(self):
            return self.value

    swapped, sentence = nlvr_swap(images, "the left image has more dogs than the right one", Draw(0.3))
    assert swapped.flatten().tolist() == [1.0, 0.0] and sentence == "the right image has more dogs than the left one"
    same, sentence = nlvr_swap(images, "the left image", Draw(0.7))
    assert same.flatten().tolist() == [0.0, 1.0] and sentence == "the left image"


def test_nlvr_training_items_swapped_about_half_the_time_test_items_never(tmp_path):
    train = _dataset(tmp_path / "a", "nlvr", n=16)
    test = _dataset(tmp_path / "b", "nlvr", "test", n=16)
    reference = train.load_image  # the same draws as __getitem__, so compare each pair with its images as loaded

    def swaps(dataset):
        count = 0
        for index in range(len(dataset)):
            rng = dataset.rng(index)
            pair = torch.stack([reference.__func__(dataset, index, rng, path) for path in dataset.samples[index]["images"]])
            item = dataset[index]
            count += not torch.equal(item["image"], pair)
        return count

    assert 0 < swaps(train) < len(train)
    assert swaps(test) == 0
