"""mplug.run.data: the authors' formats read and checked, text cleaning, answer weights, seeded augmentation, the
resumable sampler, and batches whose inputs are exactly the model methods' keyword arguments."""
import inspect
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from mplug.run.data import build_dataset, build_loader, check_vocabulary, clean_text, load_tokenizer
from mplug.run.data.loader import ResumableDistributedSampler
from mplug.run.data.text import clean_answer
from mplug.run.data.transforms import AUGMENT_OPS, augment_op, crop_box
from mplug.model.mplug import MPLUG
from mplug.run.authors_options import check_authors_options
from mplug.run.run_config import build_model_config, load_config
from test_images import write_bomb, write_png
from tiny_dataset import write_tiny_dataset

TRAIN_METHODS = {"vqa": MPLUG.vqa_loss, "caption": MPLUG.caption_loss, "retrieval": MPLUG.retrieval_loss,
                 "pretrain": MPLUG.pretrain_losses, "ve": MPLUG.ve_loss, "nlvr": MPLUG.nlvr_loss, "grounding": MPLUG.grounding_loss}
TEST_METHODS = {"vqa": MPLUG.vqa_generate, "caption": MPLUG.caption_generate, "retrieval": MPLUG.retrieval_scores,
                "ve": MPLUG.ve_predict, "nlvr": MPLUG.nlvr_predict, "grounding": MPLUG.ground}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """task -> (config, tokenizer) of a tiny generated data set."""
    root = tmp_path_factory.mktemp("tiny")
    made = {}
    for task in TRAIN_METHODS:
        cfg = load_config(str(write_tiny_dataset(root / task, task)))
        made[task] = cfg, load_tokenizer(cfg["vocab"])
    return made


def first_batch(dataset, cfg, train):
    loader, _ = build_loader(dataset, cfg, train=train, rank=0, world_size=1)
    return next(iter(loader))


@pytest.mark.parametrize("text, max_words, expected", [
    ("A man's dog, running-fast/jumping!  (Yes)", 30, "a mans dog running fast jumping yes"),
    ("What is the <person> holding?", 30, "what is the person holding"),
    ('  "Quoted"; text: ~here~ #1 *star*  ', 30, "quoted text here 1 star"),
    ("one two three four five", 3, "one two three"),
    ("?!.", 5, ""),
])
def test_clean_text_follows_the_authors_rules(text, max_words, expected):
    assert clean_text(text, max_words) == expected


def test_clean_answer_keeps_punctuation():
    assert clean_answer("  2:30  PM ", 10) == "2:30 pm"
    assert clean_answer("a b c", 2) == "a b"


def test_tokenizer_from_vocab_matches_the_tiny_model(tiny):
    cfg, tokenizer = tiny["vqa"]
    check_vocabulary(tokenizer, build_model_config(cfg))
    ids = tokenizer("a picture of two red circles")["input_ids"]
    assert ids[0] == 101 and ids[-1] == 102 and 100 not in ids, "every word of the tiny data is in its vocab"
    with pytest.raises(ValueError, match="the model takes at most 120 tokens"):
        check_vocabulary(tokenizer, build_model_config(cfg).replace(vocab_size=120, mask_token_id=3))


def test_vocab_errors(tmp_path):
    with pytest.raises(ValueError, match="config key 'vocab' is not set"):
        load_tokenizer(None)
    with pytest.raises(ValueError, match="is not a file"):
        load_tokenizer(tmp_path / "none.txt")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nhello\n")
    with pytest.raises(ValueError, match=r"lacks the special tokens \['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        load_tokenizer(tmp_path / "vocab.txt")


def test_vqa_answer_weights_count_for_vqa_and_half_for_vg_and_gqa(tiny, tmp_path):
    cfg, tokenizer = tiny["vqa"]
    records = [
        {"image": "img_0.png", "question": "What color?", "answer": ["Red", "red", "blue", " red "], "dataset": "vqa"},
        {"image": "img_1.png", "question": "How many?", "answer": "two", "dataset": "vg"},
        {"image": "img_2.png", "question": "Which shape?", "answer": ["circle", "square"], "dataset": "gqa"},
    ]
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = {**cfg, "train_file": str(tmp_path / "train.json")}
    dataset = build_dataset("vqa", "train", cfg, tokenizer)
    assert [(s["answers"], s["weights"]) for s in dataset.samples] == [
        (["red", "blue"], [0.75, 0.25]), (["two"], [0.5]), (["circle", "square"], [0.5, 0.5])]
    batch = dataset.collate([dataset[0], dataset[1], dataset[2]])["inputs"]
    assert batch["weights"].tolist() == [0.75, 0.25, 0.5, 0.5, 0.5]
    assert batch["answers_per_question"].tolist() == [2, 1, 2]
    assert tokenizer.decode(batch["answer_ids"][1][batch["answer_mask"][1]]) == "[CLS] blue [SEP]"
    # the raw question, "?" kept (the authors' dataset/vqa_dataset.py:70 leaves pre_question commented out)
    assert tokenizer.decode(batch["question_ids"][0][batch["question_mask"][0]]) == "[CLS] what color [UNK] [SEP]"


def _write_records(tmp_path, cfg, key, records):
    path = tmp_path / f"{key}.json"
    path.write_text(json.dumps(records))
    return {**cfg, key: str(path)}, path


BAD_RECORDS = {  # task -> (split, good record, [(bad record, message)])
    "vqa": ("train", {"image": "img_0.png", "question": "What color?", "answer": ["red"], "dataset": "vqa"}, [
        ({"image": "img_99.png", "question": "What?", "answer": ["red"], "dataset": "vqa"}, "img_99.png does not exist"),
        ({"image": "img_0.png", "answer": ["red"], "dataset": "vqa"}, "missing key 'question'"),
        ({"image": "img_0.png", "question": "What?", "answer": [], "dataset": "vqa"}, "key 'answer' is an empty list"),
        ({"image": "img_0.png", "question": 7, "answer": ["red"], "dataset": "vqa"}, "key 'question' must be a non-empty string, got int"),
        ({"image": "img_0.png", "question": "What?", "answer": ["red"], "dataset": "coco"}, "key 'dataset' must be one of"),
        (["not", "a", "dict"], "must be a JSON object, got list"),
    ]),
    "caption": ("test", {"filename": "img_0.png", "filepath": "val2014", "sentences": [{"raw": "A dog."}]}, [
        ({"filename": "img_0.png", "filepath": "val2014", "sentences": []}, "key 'sentences' must be a non-empty list"),
        ({"filename": "img_0.png", "filepath": "val2014", "sentences": [{"text": "a"}]}, "key 'sentences' must be a non-empty list"),
        ({"filename": "nope.png", "filepath": "val2014", "sentences": [{"raw": "a"}]}, "nope.png does not exist"),
    ]),
    "retrieval": ("train", {"image": "images/img_0.png", "caption": "A dog.", "image_id": 3}, [
        ({"image": "images/img_0.png", "caption": "A dog."}, "missing key 'image_id'"),
        ({"image": "images/img_0.png", "caption": ["A dog."], "image_id": 3}, "key 'caption' must be a non-empty string, got list"),
        ({"image": "images/img_0.png", "caption": "A dog.", "image_id": 1.5}, "key 'image_id' must be an int or a string"),
    ]),
    "pretrain": ("train", {"image": "images/img_0.png", "caption": ["A dog.", "A cat."]}, [
        ({"image": "images/img_0.png", "caption": ["A dog.", 3]}, "key 'caption' must hold only non-empty strings"),
        ({"image": "images/img_0.png", "caption": {"a": 1}}, "key 'caption' must be a non-empty list of strings"),
    ]),
    "ve": ("train", {"image": "img_0.png", "sentence": "A dog.", "label": "neutral"}, [
        ({"image": "img_0.png", "sentence": "A dog.", "label": "maybe"}, "key 'label' must be one of"),
        ({"image": "img_0.png", "sentence": "A dog.", "label": 1}, "key 'label' must be one of"),
        ({"image": "img_9.png", "sentence": "A dog.", "label": "neutral"}, "img_9.png does not exist"),
    ]),
    "nlvr": ("test", {"images": ["img_0.png", "img_1.png"], "sentence": "Both red.", "label": "True"}, [
        ({"images": ["img_0.png"], "sentence": "Both red.", "label": True}, "key 'images' must hold two image paths"),
        ({"images": ["img_0.png", "img_1.png"], "sentence": "Both red.", "label": "yes"}, "key 'label' must be 'True', 'False' or a bool"),
        ({"images": ["img_0.png", "img_1.png"], "label": False}, "missing key 'sentence'"),
    ]),
    "grounding": ("train", {"image": "img_0.png", "text": "The red circle.", "bbox": [1, 2, 10.5, 8]}, [
        ({"image": "img_0.png", "text": "The red circle.", "bbox": [1, 2, 10]}, "key 'bbox' must be four numbers"),
        ({"image": "img_0.png", "text": "The red circle.", "bbox": [60, 2, 10, 8]}, "has no area inside the 48x40 image"),
        ({"image": "img_0.png", "text": "The red circle.", "bbox": [1, 2, 0, 8]}, "has no area inside"),
        ({"image": "img_0.png", "bbox": [1, 2, 3, 4]}, "missing key 'text'"),
    ]),
}


def test_grounding_boxes_are_normalised_centre_size_and_clipped_to_the_image(tiny, tmp_path):
    cfg, tokenizer = tiny["grounding"]
    records = [{"image": "img_0.png", "sentence": "the box", "bbox": [-4, 10, 20, 40]},  # 48 x 40 image: x, y clipped
               {"image": "img_0.png", "text": "the box", "bbox": [6, 4, 12, 8]}]
    cfg_boxes, _ = _write_records(tmp_path, cfg, "test_file", records)
    dataset = build_dataset("grounding", "test", cfg_boxes, tokenizer)
    assert [sample["box"] for sample in dataset.samples] == [[8 / 48, 25 / 40, 16 / 48, 30 / 40], [12 / 48, 8 / 40, 12 / 48, 8 / 40]]
    # letterboxed to 32 (their grounding_dataset.py:379-383): ratio 2/3, 32 x 27 at top round(2.5 - 0.1) = 2; pixel
    # boxes (0, 10, 16, 40), (6, 4, 18, 12) -> (0, 8.67, 10.67, 28.67), (4, 4.67, 12, 10) -> (cx, cy, w, h) / 32
    expected = [[16 / 3 / 32, 56 / 3 / 32, 32 / 3 / 32, 20 / 32], [8 / 32, 22 / 3 / 32, 8 / 32, 16 / 3 / 32]]
    assert first_batch(dataset, cfg, False)["meta"]["box"] == [pytest.approx(box, abs=1e-6) for box in expected]


def test_grounding_pixel_boxes_are_truncated_to_ints_as_the_authors_do(tiny, tmp_path):
    """np.array(bbox, dtype=int) then x2 = x + w (AliceMind mPLUG/dataset/grounding_dataset.py:290-292):
    [6.9, 4.5, 12.99, 8.2] -> [6, 4, 12, 8] -> x 6..18, y 4..12 in the 48 x 40 image."""
    cfg, tokenizer = tiny["grounding"]
    records = [{"image": "img_0.png", "text": "the box", "bbox": [6.9, 4.5, 12.99, 8.2]}]
    cfg_boxes, _ = _write_records(tmp_path, cfg, "test_file", records)
    dataset = build_dataset("grounding", "test", cfg_boxes, tokenizer)
    assert dataset.samples[0]["box"] == [12 / 48, 8 / 40, 12 / 48, 8 / 40]


@pytest.mark.parametrize("task", BAD_RECORDS)
def test_bad_records_raise_naming_file_and_record_or_are_skipped_and_counted(tiny, tmp_path, task):
    cfg, tokenizer = tiny[task]
    split, good, bad = BAD_RECORDS[task]
    key = "train_file" if split == "train" else "test_file"
    for record, message in bad:
        cfg_bad, path = _write_records(tmp_path, cfg, key, [good, record, good])
        with pytest.raises(ValueError, match=re.escape(f"{path}: record 1: ") + ".*" + re.escape(message)):
            build_dataset(task, split, cfg_bad, tokenizer)
    cfg_bad, path = _write_records(tmp_path, cfg, key, [good] + [record for record, _ in bad] + [good])
    dataset = build_dataset(task, split, cfg_bad, tokenizer, skip_bad_records=True)
    assert dataset.skipped == len(bad) and len(dataset.skipped_reasons) == len(bad)
    assert [reason.split(": ")[1] for reason in dataset.skipped_reasons] == [f"record {i}" for i in range(1, len(bad) + 1)]
    assert len(dataset) == 2 * (1 if task != "caption" or split == "test" else len(good["sentences"]))


def test_bad_files_and_unset_paths_are_named(tiny, tmp_path):
    cfg, tokenizer = tiny["vqa"]
    with pytest.raises(ValueError, match="config key 'train_file' is not set but the vqa train data needs it"):
        build_dataset("vqa", "train", {**cfg, "train_file": None}, tokenizer)
    with pytest.raises(ValueError, match="config key 'vg_root' is not set"):
        build_dataset("vqa", "train", {**cfg, "vg_root": None}, tokenizer)
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="broken.json: annotation file is not valid JSON"):
        build_dataset("vqa", "train", {**cfg, "train_file": str(tmp_path / "broken.json")}, tokenizer)
    with pytest.raises(ValueError, match="missing.json: annotation file does not exist"):
        build_dataset("vqa", "train", {**cfg, "train_file": [str(tmp_path / "missing.json")]}, tokenizer)
    cfg_empty, path = _write_records(tmp_path, cfg, "answer_list", [])
    with pytest.raises(ValueError, match=re.escape(f"{path}: the answer list must be a non-empty JSON list")):
        build_dataset("vqa", "test", cfg_empty, tokenizer)
    with pytest.raises(ValueError, match="no usable records"):
        build_dataset("vqa", "train", _write_records(tmp_path, cfg, "train_file", [{}])[0], tokenizer, skip_bad_records=True)
    with pytest.raises(ValueError, match="pretrain has no test split"):
        build_dataset("pretrain", "test", cfg, tokenizer)
    with pytest.raises(ValueError, match="vocab: the tokenizer has 141 tokens"):
        build_dataset("vqa", "train", {**cfg, "model": "tiny", "image_size": 32}, load_tokenizer(_bert_layout_vocab(tmp_path, 141)))


def _bert_layout_vocab(tmp_path, size):
    """A vocab.txt of size tokens whose [MASK] is not at BERT's id 103."""
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(size - 5)]
    (tmp_path / "other_vocab.txt").write_text("\n".join(tokens) + "\n")
    return tmp_path / "other_vocab.txt"


def test_shipped_config_placeholders_fail_only_when_the_data_is_read(tiny):
    _, tokenizer = tiny["vqa"]
    cfg = load_config("vqa_base")
    with pytest.raises(ValueError, match=re.escape("config key 'train_file' is not set but the vqa train data needs it: "
                                                   "pass --set train_file=PATH")):
        build_dataset("vqa", "train", cfg, tokenizer)


def test_unreadable_image_names_file_and_record(tiny, tmp_path):
    cfg, tokenizer = tiny["retrieval"]
    (tmp_path / "broken.png").write_bytes(b"not a png")
    cfg, path = _write_records(tmp_path, cfg, "train_file", [{"image": str(tmp_path / "broken.png"), "caption": "a", "image_id": 1}])
    dataset = build_dataset("retrieval", "train", cfg, tokenizer)
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 0: cannot read image")):
        dataset[0]


def _truncated_png(path):
    """A PNG cut in half (the header is whole, the pixels are not)."""
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def test_undecodable_images_and_bombs_are_named_or_dropped_from_their_batch(tiny, tmp_path):
    """Issue 23 items 7, 8: a truncated PNG and a 20000x20000 PNG (a few hundred KB) are bad records: named by file
    and record, or with skip_bad_records dropped from the batch (listed in batch["dropped"]); a batch of only bad
    records has no inputs."""
    cfg, tokenizer = tiny["retrieval"]
    cut, bomb = _truncated_png(tmp_path / "cut.png"), tmp_path / "bomb.png"
    write_bomb(bomb, 20000)
    good = {"image": "images/img_0.png", "caption": "a red circle", "image_id": 1}
    records = [good, {**good, "image": str(cut)}, good, {**good, "image": str(bomb)}]
    cfg_bad, path = _write_records(tmp_path, cfg, "train_file", records)
    strict = build_dataset("retrieval", "train", cfg_bad, tokenizer)
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 1: cannot read image {cut}")):
        strict[1]
    with pytest.raises(ValueError, match=re.escape(f"{path}: record 3: image {bomb} is over the limit max_image_pixels")):
        strict[3]
    dataset = build_dataset("retrieval", "train", cfg_bad, tokenizer, skip_bad_records=True)
    batches = list(build_loader(dataset, cfg, train=False, rank=0, world_size=1)[0])
    assert [batch["meta"]["index"] for batch in batches] == [[0], [2]]
    assert [batch["inputs"]["images"].shape[0] for batch in batches] == [1, 1]
    dropped = [drop for batch in batches for drop in batch["dropped"]]
    assert [(drop["position"], drop["index"]) for drop in dropped] == [(1, 1), (1, 3)]
    assert dropped[0]["reason"].startswith(f"{path}: record 1: cannot read image {cut}")
    assert dropped[1]["reason"].startswith(f"{path}: record 3: image {bomb} is over the limit")
    only_bad, _ = _write_records(tmp_path, cfg, "train_file", records[1::2])
    dataset = build_dataset("retrieval", "train", only_bad, tokenizer, skip_bad_records=True)
    (batch,) = build_loader(dataset, cfg, train=False, rank=0, world_size=1)[0]
    assert batch["inputs"] is None and batch["meta"] is None and len(batch["dropped"]) == 2


def test_max_image_pixels_makes_a_normal_image_a_bad_record(tiny):
    cfg, tokenizer = tiny["caption"]
    low = build_dataset("caption", "test", {**cfg, "max_image_pixels": 1919}, tokenizer)  # the images are 48 x 40
    with pytest.raises(ValueError, match=r"caption_test\.json: record 0: image .*img_0\.png is 48x40 = 1920 pixels, over "
                                         r"the limit max_image_pixels = 1919"):
        low[0]
    assert build_dataset("caption", "test", {**cfg, "max_image_pixels": 1920}, tokenizer)[0]["image"].shape == (3, 32, 32)
    skipping = build_dataset("caption", "test", {**cfg, "max_image_pixels": 1919}, tokenizer, skip_bad_records=True)
    batch = first_batch(skipping, cfg, False)
    assert batch["inputs"] is None and [drop["index"] for drop in batch["dropped"]] == [0, 1]


def test_16_bit_grey_image_reaches_the_model_grey_not_white(tiny, tmp_path):
    """Issue 23 item 6 through the data set: a 16-bit grey PNG of level 128 * 257 gives the tensor of an 8-bit grey
    128 image, not that of a white one (convert("RGB") saturated it)."""
    cfg, tokenizer = tiny["caption"]
    write_png(tmp_path / "grey16.png", np.full((40, 48), 128 * 257, dtype=np.uint16), color_type=0)
    Image.new("RGB", (48, 40), (128, 128, 128)).save(tmp_path / "grey8.png")
    Image.new("RGB", (48, 40), (255, 255, 255)).save(tmp_path / "white.png")
    records = [{"filename": name, "filepath": str(tmp_path), "sentences": [{"raw": "a picture"}]}
               for name in ("grey16.png", "grey8.png", "white.png")]
    dataset = build_dataset("caption", "test", _write_records(tmp_path, cfg, "test_file", records)[0], tokenizer)
    grey16, grey8, white = (dataset[i]["image"] for i in range(3))
    assert torch.equal(grey16, grey8) and not torch.equal(grey16, white)


def test_augmentation_is_a_function_of_seed_epoch_and_index(tiny):
    cfg, tokenizer = tiny["pretrain"]
    dataset, again = build_dataset("pretrain", "train", cfg, tokenizer), build_dataset("pretrain", "train", cfg, tokenizer)
    first = dataset[3]["image"]
    assert first.shape == (3, 32, 32) and first.dtype == torch.float32
    assert torch.equal(first, dataset[3]["image"]) and torch.equal(first, again[3]["image"])
    views = set()
    for epoch in range(4):
        dataset.set_epoch(epoch)
        views.add(dataset[3]["image"].numpy().tobytes())
    assert len(views) == 4, "each epoch draws a new augmentation"
    reseeded = build_dataset("pretrain", "train", {**cfg, "seed": cfg["seed"] + 1}, tokenizer)
    assert not torch.equal(first, reseeded[3]["image"])
    test = build_dataset("caption", "test", *tiny["caption"])
    test.set_epoch(5)
    assert torch.equal(test[0]["image"], build_dataset("caption", "test", *tiny["caption"])[0]["image"]), "test images are not augmented"


def test_batches_do_not_depend_on_worker_count(tiny):
    cfg, tokenizer = tiny["vqa"]
    dataset = build_dataset("vqa", "train", cfg, tokenizer)
    dataset.set_epoch(2)
    serial = first_batch(dataset, cfg, True)
    parallel = first_batch(dataset, {**cfg, "num_workers": 2}, True)
    assert serial["meta"] == parallel["meta"]
    for key, value in serial["inputs"].items():
        assert torch.equal(value, parallel["inputs"][key]), key


def test_every_augment_op_changes_pixels_but_keeps_the_size():
    import random

    from PIL import Image

    image = Image.frombytes("RGB", (64, 48), bytes(60 + (i * 37) % 61 for i in range(64 * 48 * 3)))  # low contrast
    for name in AUGMENT_OPS:
        out = augment_op(image, name, random.Random(0))
        assert out.size == image.size and out.mode == "RGB"
        assert (out.tobytes() == image.tobytes()) == (name == "identity"), name


def test_crop_box_stays_inside_and_covers_the_scale():
    import random

    rng = random.Random(0)
    for _ in range(200):
        left, top, right, bottom = crop_box(50, 30, rng, (0.5, 1.0))
        assert 0 <= left < right <= 50 and 0 <= top < bottom <= 30
        assert (right - left) * (bottom - top) >= 0.4 * 50 * 30


class Indices(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n


@pytest.mark.parametrize("n, replicas", [(10, 1), (10, 2), (11, 2), (9, 3)])
def test_sampler_resume_gives_exactly_the_tail_and_replicas_partition(n, replicas):
    data = Indices(n)
    shares = []
    for rank in range(replicas):
        sampler = ResumableDistributedSampler(data, replicas, rank, shuffle=True, seed=3)
        sampler.set_epoch(4)
        full = list(sampler)
        shares.append(full)
        for skip in range(len(full) + 1):
            resumed = ResumableDistributedSampler(data, replicas, rank, shuffle=True, seed=3)
            resumed.set_epoch(4)
            resumed.skip(skip)
            assert list(resumed) == full[skip:] and len(resumed) == len(full) - skip
        resumed.set_epoch(5)
        assert len(list(resumed)) == len(full), "a new epoch starts from its beginning"
    assert sorted(set(i for share in shares for i in share)) == list(range(n))
    if n % replicas == 0:
        assert sum(len(share) for share in shares) == n
    sampler.set_epoch(5)
    assert list(sampler) != shares[-1], "each epoch reshuffles"
    unpadded = [list(ResumableDistributedSampler(data, replicas, rank, shuffle=False, pad=False)) for rank in range(replicas)]
    assert sorted(i for share in unpadded for i in share) == list(range(n)), "evaluation sees each sample once"
    with pytest.raises(ValueError, match="skip must be an int in"):
        sampler.skip(len(shares[-1]) + 1)
    with pytest.raises(ValueError, match="0 <= rank < num_replicas"):
        ResumableDistributedSampler(data, replicas, replicas)


def _required(method):
    params = list(inspect.signature(method).parameters.values())[1:]
    return {p.name for p in params if p.default is inspect.Parameter.empty and p.kind != p.VAR_KEYWORD}, {p.name for p in params}


@pytest.mark.parametrize("task", TRAIN_METHODS)
def test_train_batch_runs_the_tiny_models_loss(tiny, task):
    cfg, tokenizer = tiny[task]
    dataset = build_dataset(task, "train", cfg, tokenizer)
    batch = first_batch(dataset, cfg, True)
    inputs = batch["inputs"]
    required, accepted = _required(TRAIN_METHODS[task])
    assert required <= set(inputs) <= accepted
    assert all(isinstance(v, torch.Tensor) for k, v in inputs.items() if k != "prompt_length")
    pair = (2,) if task == "nlvr" else ()
    assert batch["meta"]["index"] and inputs["images"].shape == (cfg["batch_size_train"], *pair, 3, 32, 32)
    torch.manual_seed(0)
    model = MPLUG(build_model_config(cfg).replace(attn_backend="reference"))
    extra = {"distill": False} if task in ("retrieval", "pretrain") else {}  # no momentum copies: faster, same inputs
    losses = getattr(model, TRAIN_METHODS[task].__name__)(**inputs, **extra)
    losses = losses if isinstance(losses, dict) else {"loss": losses}
    assert losses and all(torch.isfinite(loss) and loss > 0 for loss in losses.values()), losses


@pytest.mark.parametrize("task", TEST_METHODS)
def test_test_batch_feeds_the_tiny_models_inference(tiny, task):
    cfg, tokenizer = tiny[task]
    dataset = build_dataset(task, "test", cfg, tokenizer)
    batch = first_batch(dataset, cfg, False)
    inputs = dict(batch["inputs"])
    if task == "retrieval":
        inputs.update(dataset.text_inputs())
    required, accepted = _required(TEST_METHODS[task])
    assert required <= set(inputs) <= accepted
    torch.manual_seed(0)
    model = MPLUG(build_model_config(cfg).replace(attn_backend="reference")).eval()
    if task == "retrieval":
        scores = model.retrieval_scores(**inputs, k=2)
        assert scores.itc.shape == (2, len(dataset.texts))
        assert batch["meta"] == {"image_index": [0, 1], "text_ids": [[0, 1], [2, 3]]}
        assert [dataset.txt2img[t] for t in range(4)] == [0, 0, 1, 1]
        return
    if task in ("ve", "nlvr", "grounding"):
        out = getattr(model, TEST_METHODS[task].__name__)(**inputs)
        assert out.shape[0] == 2 and batch["meta"]["record"] == [0, 1] and len(batch["meta"]["file"]) == 2
        return
    out = getattr(model, TEST_METHODS[task].__name__)(**inputs, num_beams=2, min_length=1, max_length=3)
    assert out.sequences.shape[0] == 2
    ids = {"vqa": "question_id", "caption": "image_id"}[task]
    assert batch["meta"][ids] == [dataset.samples[i][ids] for i in range(2)]


def test_caption_prompt_is_in_the_ids_and_not_predicted(tiny):
    # prompt_mode vatex (model_caption_mplug_vatex.py:32,66-68): "prompt caption", the prompt's tokens masked out
    cfg, tokenizer = tiny["caption"]
    cfg = {**cfg, "prompt": "A picture of", "prompt_mode": "vatex"}
    train = build_dataset("caption", "train", cfg, tokenizer)
    batch = first_batch(train, cfg, True)
    inputs = batch["inputs"]
    assert inputs["prompt_length"] == 3
    assert tokenizer.decode(inputs["caption_ids"][0][1:4]) == "a picture of"
    index = batch["meta"]["index"][0]
    spaced = tokenizer("a picture of " + train.samples[index]["caption"])["input_ids"]
    assert inputs["caption_ids"][0][inputs["caption_mask"][0]].tolist() == spaced
    test = build_dataset("caption", "test", cfg, tokenizer)
    batch = first_batch(test, cfg, False)
    assert tokenizer.decode(batch["inputs"]["prompt_ids"][0]) == "[CLS] a picture of"
    assert batch["meta"]["references"][0][0].startswith("A picture of"), "references stay raw"
    with pytest.raises(ValueError, match="max_tokens = 4 must exceed it by 2"):
        build_dataset("caption", "train", {**cfg, "max_tokens": 4}, tokenizer)


def test_caption_prompt_the_authors_way_is_joined_and_learnt(tiny):
    # prompt_mode authors (the default; caption_mplug.py:50-51): config['prompt'] + caption + eos with no space
    # between, and model_caption_mplug.py masks only padding, so the prompt's tokens are predicted (prompt_length 0).
    # By hand: "a picture of" + "a picture of three yellow circles." -> "a picture ofa picture ..." ("ofa" is [UNK]).
    cfg, tokenizer = tiny["caption"]
    cfg = {**cfg, "prompt": "A picture of"}
    assert cfg["prompt_mode"] == "authors"
    train = build_dataset("caption", "train", cfg, tokenizer)
    batch = first_batch(train, cfg, True)
    inputs = batch["inputs"]
    assert inputs["prompt_length"] == 0
    for row, index in enumerate(batch["meta"]["index"]):
        joined = tokenizer("a picture of" + train.samples[index]["caption"])["input_ids"]
        assert inputs["caption_ids"][row][inputs["caption_mask"][row]].tolist() == joined
    assert tokenizer.decode(tokenizer("a picture of" + "a picture of three yellow circles.")["input_ids"]) == \
        "[CLS] a picture [UNK] picture of three yellow circles [UNK] [SEP]"
    with pytest.raises(ValueError, match="'prompt_mode' must be one of"):
        check_authors_options({**cfg, "prompt_mode": "spaced"})
