"""Issue 24, reproducing the authors' numbers: each test against a hand-worked example from the authors' AliceMind
mPLUG/ code (the file and line named at the test)."""
import json
from pathlib import Path

import torch

from mplug.run import evaluate_rows
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
    assert evaluate_rows.decode(tokenizer, ids, tokenizer.sep_token_id) == ["don't", "it's red", "yes"]


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


def _itc_worker(rank, world_size, store_path, data, out_path):
    """This rank's ITC loss on its half of the batch, with the local and the global bank."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        model = _tiny_mplug()
        half = [x[rank * 2 : rank * 2 + 2] for x in data]
        losses = {bank: model.pretrain_losses(*half, objectives=("itc",), update_queue=False, itc_bank=bank)["itc"]
                  for bank in ("local", "global")}
        torch.save({bank: loss.detach() for bank, loss in losses.items()}, f"{out_path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _tiny_mplug():
    from mplug import MPLUG, MPLUGConfig

    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny())


def test_itc_bank_is_the_local_batch_and_queue_by_default_on_two_gloo_processes(tmp_path):
    # models/model_retrieval_mplug.py:48,52: image_feat_all = cat([image_feat_m.t(), image_queue]) of this process's
    # batch only; so each rank's loss equals one process's loss on that rank's half. "global" (ours) differs.
    import torch.multiprocessing as mp
    from test_model_tasks import batch

    data = batch(4, seed=21, dtype=torch.float32)
    out = str(tmp_path / "itc")
    mp.spawn(_itc_worker, args=(2, str(tmp_path / "store"), data, out), nprocs=2, join=True)
    model = _tiny_mplug()
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        half = [x[rank * 2 : rank * 2 + 2] for x in data]
        alone = model.pretrain_losses(*half, objectives=("itc",), update_queue=False)["itc"].detach()
        torch.testing.assert_close(got["local"], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(got["global"], alone, atol=1e-3)


def test_parameter_groups_as_the_authors_two_optimiser():
    # optim/optim_factory.py:141-167: lr2 only for model.visual_encoder (the ViT; their visn_fc / visn_layer_norm sit
    # outside it, so lr1); no decay where the name holds "bias" or "LayerNorm.weight" (so CLIP's ln_1.weight and temp
    # keep weight decay).
    from mplug.run.train import parameter_groups

    model = _tiny_mplug()  # tiny: vision_width 48 != hidden 64, so it has visn_fc / visn_layer_norm like the large model
    groups = parameter_groups(model, {"lr": 3e-5, "lr_visual": 5e-6, "lr_head": None, "weight_decay": 0.02})
    setting = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    expected = {
        "visual_encoder.visn_fc.weight": (3e-5, 0.02), "visual_encoder.visn_fc.bias": (3e-5, 0.0),
        "visual_encoder.visn_layer_norm.weight": (3e-5, 0.02), "visual_encoder.visn_layer_norm.bias": (3e-5, 0.0),
        "visual_encoder.visual.transformer.resblocks.0.ln_1.weight": (5e-6, 0.02),
        "visual_encoder.visual.transformer.resblocks.0.ln_1.bias": (5e-6, 0.0),
        "text_encoder.embeddings.LayerNorm.weight": (3e-5, 0.0), "text_encoder.embeddings.LayerNorm.bias": (3e-5, 0.0),
        "text_encoder.embeddings.word_embeddings.weight": (3e-5, 0.02), "temp": (3e-5, 0.02),
    }
    assert {name: setting[id(named[name])] for name in expected} == expected


def test_authors_schedule_hand_worked():
    # scheduler/cosine_lr.py _get_lr with vqa_mplug.py:46-47,86-87 (warm-up stepped after iteration i when
    # i % 100 == 0 and i <= 400, to t = i // 100) and :276 (step(epoch + warmup_epochs) from epoch 1).
    # configs/vqa_mplug_base.yaml: lr1 3e-5, lr2 5e-6, warmup_lr 1e-5, warmup_epochs 4, min_lr 1e-6, epochs 8.
    # By hand, 1000 iterations per epoch, lr1: steps 0..100 1e-5 (t = 0); 101..200 1e-5 + 1 x 2e-5 / 4 = 1.5e-5;
    # 301..400 2.5e-5; 401..999 3e-5 (t = 4: cosine at 0); epoch 1: 1e-6 + 2.9e-5 (1 + cos(pi/8)) / 2 = 2.8896253e-5;
    # epoch 7: 1e-6 + 1.45e-5 (1 + cos(7 pi/8)) = 2.1038e-6. lr2 (5e-6) at step 150: 1e-5 - 5e-6 / 4 = 8.75e-6.
    from mplug.run.train import build_schedule

    weights = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.AdamW([{"params": [weights[0]], "lr": 3e-5}, {"params": [weights[1]], "lr": 5e-6}])
    schedule = {"kind": "authors", "warmup_steps": 400, "warmup_ratio": None, "min_lr": 1e-6, "warmup_lr": 1e-5}
    scheduler = build_schedule(optimizer, schedule, 8000, epochs=8, steps_per_epoch=1000)
    seen = {}
    for step in range(8000):
        seen[step] = [group["lr"] for group in optimizer.param_groups]  # the lr optimiser step `step` uses
        optimizer.step()
        scheduler.step()
    expected = {0: 1e-5, 100: 1e-5, 101: 1.5e-5, 200: 1.5e-5, 301: 2.5e-5, 400: 2.5e-5, 401: 3e-5, 999: 3e-5,
                1000: 2.8896253e-5, 1999: 2.8896253e-5, 7000: 2.1037472e-6}
    for step, lr in expected.items():
        assert abs(seen[step][0] - lr) < 1e-12, (step, seen[step][0], lr)
    assert abs(seen[150][1] - 8.75e-6) < 1e-12


def test_authors_options_are_checked():
    import pytest
    from mplug.run.run_config import load_config

    assert load_config("vqa_base", ["schedule.kind=authors"])["schedule"]["warmup_lr"] == 1e-5  # vqa_mplug_base.yaml
    for override, key in (("itc_bank=everyone", "itc_bank"), ("schedule.kind=linear", "schedule.kind"),
                          ("schedule.warmup_steps=150", "multiple of 100"), ("add_ocr=3", "add_ocr")):
        with pytest.raises(ValueError, match=key):
            load_config("vqa_base", [override, "schedule.kind=authors"] if "warmup_steps" in override else [override])


def test_vqa_question_raw_with_ocr_and_object_tags(tmp_path):
    # dataset/vqa_dataset.py:56-70: question + " [SEP] " + pre_question(" ".join(ocr tokens), 30) + " [SEP] " +
    # " ".join(object_label.split("&&")), the question itself not cleaned (pre_question commented out, :70).
    # By hand: "What's on the Sign?" with ocr [[p, "STOP"], [p, "Main-St."]] and object_label "sign&&pole" ->
    # "What's on the Sign? [SEP] stop main st [SEP] sign pole".
    def add_fields(root):
        records = json.loads((root / "vqa_train.json").read_text())
        records[0].update(question="What's on the Sign?", ocr=[[[1, 2, 3, 4], "STOP"], [[5, 6, 7, 8], "Main-St."]],
                          object_label="sign&&pole")
        (root / "vqa_train.json").write_text(json.dumps(records))

    from mplug.run.data import build_dataset
    from mplug.run.run_config import load_config

    config = write_tiny_dataset(tmp_path, "vqa", n=2)
    add_fields(tmp_path)
    tokenizer = load_tokenizer(tmp_path / "vocab.txt")
    questions = {}
    for ocr, objects in ((True, True), (False, False)):
        cfg = load_config(str(config), [f"add_ocr={str(ocr).lower()}", f"add_object={str(objects).lower()}"])
        questions[ocr] = build_dataset("vqa", "train", cfg, tokenizer).samples[0]["question"]
    assert questions[True] == "What's on the Sign? [SEP] stop main st [SEP] sign pole"
    assert questions[False] == "What's on the Sign?"
    assert tokenizer(questions[True])["input_ids"].count(tokenizer.sep_token_id) == 3  # "[SEP]" read as the token
    for size in ("base", "large"):  # scripts/vqa_mplug_{base,large}.sh: --add_ocr --add_object --max_input_length 80
        shipped = load_config(f"vqa_{size}")
        assert (shipped["add_ocr"], shipped["add_object"], shipped["max_tokens"]) == (True, True, 80)


def test_caption_training_text_raw_lower_cased_with_punctuation(tmp_path):
    # dataset/caption_dataset.py:185: caption = sent["raw"].lower() (no pre_caption). tests/tiny_dataset.py's
    # captions_of: "A picture of <count> <color> <shape>s." -> "a picture of ... s." (the full stop kept).
    dataset = _dataset(tmp_path, "caption", n=2)
    captions = [sample["caption"] for sample in dataset.samples]
    assert captions[0].startswith("a picture of ") and captions[0].endswith("s.")
    assert captions[1].startswith("an image with ") and captions[1].endswith("on the background!")


def test_grounding_query_raw_lower_cased_and_the_authors_training_values(tmp_path):
    # dataset/grounding_dataset.py:317: phrase = phrase.lower() (no cleaning); :74-92 cut to max_query_len 20 word
    # pieces including [CLS] and [SEP]. The edit writes "The RED circle, left!" -> "the red circle, left!".
    def shout(root):
        records = json.loads((root / "grounding_train.json").read_text())
        records[0] = {"image": records[0]["image"], "text": "The RED circle, left!", "bbox": records[0]["bbox"]}
        (root / "grounding_train.json").write_text(json.dumps(records))

    dataset = _dataset(tmp_path, "grounding", n=2, edit=shout)
    assert dataset.samples[0]["text"] == "the red circle, left!"
    from mplug.run.run_config import load_config

    # configs/grounding_mplug_large.yaml: batch_size_train 24, optimizer lr1 2e-5 / lr2 5e-6, schedular epochs 120,
    # warmup_epochs 20 (x step_size 100 iterations, grounding_mplug.py:86-87), min_lr 1e-6, max_query_len 20;
    # grounding_mplug.py train() clips no gradient
    for name in ("grounding_large", "grounding_base"):
        cfg = load_config(name)
        assert (cfg["batch_size_train"], cfg["epochs"], cfg["max_tokens"], cfg["max_grad_norm"]) == (24, 120, 20, 0.0)
        assert (cfg["optimizer"]["lr"], cfg["optimizer"]["lr_visual"]) == (2e-5, 5e-6)
        assert (cfg["schedule"]["warmup_steps"], cfg["schedule"]["min_lr"], cfg["schedule"]["warmup_lr"]) == (2000, 1e-6, 1e-6)


def test_query_slice_is_the_authors_split():
    # retrieval_img_mplug.py:138-140: step = N // num_tasks + 1; start = rank * step; end = min(N, start + step).
    # By hand: N 5, 2 ranks: step 3 -> [0, 3), [3, 5); N 4, 2 ranks: step 3 -> [0, 3), [3, 4) (uneven);
    # N 1, 2 ranks: step 1 -> [0, 1), [1, 1) (rank 1 has none); N 7, 1 rank: [0, 7).
    from mplug.tasks.inference import query_slice

    assert [query_slice(5, r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [query_slice(4, r, 2) for r in range(2)] == [range(0, 3), range(3, 4)]
    assert [query_slice(1, r, 2) for r in range(2)] == [range(0, 1), range(1, 1)]
    assert query_slice(7, 0, 1) == range(0, 7)
    assert [query_slice(2, r, 4) for r in range(4)] == [range(0, 1), range(1, 2), range(2, 2), range(2, 2)]


def _retrieval_worker(rank, world_size, store_path, data, out_path):
    import torch.distributed as dist

    from mplug.run.retrieval_shards import sharded_retrieval_scores

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        model = _tiny_mplug().eval()
        own = model.retrieval_scores(*data, k=2, batch_size=3, shard=(rank, world_size))
        combined = sharded_retrieval_scores(model, *data, k=2, batch_size=3)
        torch.save({"own": own._asdict(), "combined": combined._asdict()}, f"{out_path}.{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_sharded_retrieval_on_two_gloo_processes_equals_one_process(tmp_path):
    # retrieval_img_mplug.py:134-179: each rank ITM-re-ranks its query_slice of images (i2t) and of texts (t2i), the
    # matrices then combined over ranks (all_reduce). 5 images / 5 texts: rank 0 re-ranks queries 0-2, rank 1 3-4.
    import torch.multiprocessing as mp
    from test_model_tasks import batch

    data = batch(5, seed=31, dtype=torch.float32)
    out = str(tmp_path / "retrieval")
    mp.spawn(_retrieval_worker, args=(2, str(tmp_path / "store"), data, out), nprocs=2, join=True)
    with torch.no_grad():
        alone = _tiny_mplug().eval().retrieval_scores(*data, k=2, batch_size=3)
    for rank, rows in enumerate((range(0, 3), range(3, 5))):
        got = torch.load(f"{out}.{rank}")
        for way in ("i2t", "t2i"):
            torch.testing.assert_close(got["combined"][way], getattr(alone, way), atol=1e-5, rtol=1e-5)
            own = got["own"][way]  # this rank's share only: its rows as one process, -inf elsewhere
            torch.testing.assert_close(own[rows.start:rows.stop], getattr(alone, way)[rows.start:rows.stop], atol=1e-5, rtol=1e-5)
            others = [row for row in range(5) if row not in rows]
            assert torch.isneginf(own[others]).all()
            assert torch.isfinite(own[rows.start:rows.stop]).sum(1).tolist() == [2] * len(rows)
