"""The data set of one task's split: samples read up front (mplug.run.data.records), images decoded lazily, and a collate
that builds the keyword arguments of the model method of the task (``batch["inputs"]``) plus the ids (``batch["meta"]``).

inputs: train vqa -> MPLUG.vqa_loss, caption -> caption_loss (prompt_length an int), retrieval -> retrieval_loss,
pretrain -> pretrain_losses, ve -> ve_loss, nlvr -> nlvr_loss (images [B, 2, 3, H, W]), grounding -> grounding_loss;
test vqa -> vqa_generate (images, question_ids, question_mask), caption -> caption_generate (images, and prompt_ids
when the config has a prompt), retrieval -> the images of retrieval_scores (the texts of every image at once:
``dataset.text_inputs()``), ve / nlvr / grounding -> ve_predict / nlvr_predict / ground (images, text_ids, text_mask).
meta: train {"index"}; test vqa {"question_id", "answers" (raw, None where a record has none)}, caption {"image_id",
"references" (raw sentences)}, retrieval {"image_index", "text_ids" (indices into dataset.texts of each image)},
ve / nlvr {"file", "record", "label"}, grounding {"file", "record", "box" (the target, normalised cx, cy, w, h in the
letterboxed image)}. Grounding images are letterboxed as the authors' (GroundingDataset).
"""
from __future__ import annotations

import random
from typing import Dict, List

import torch
from torch.utils.data import Dataset

from mplug.run.data.augment import nlvr_swap
from mplug.run.data.bad_images import BAD, bad_item, split_items
from mplug.run.data.grounding_augment import Augment, augment_train
from mplug.run.data.grounding_transforms import letterbox_eval, pixel_box
from mplug.run.data.images import DEFAULT_MAX_PIXELS, BadImage, open_rgb
from mplug.run.data.prompt import generation_prompt_ids, training_prompt
from mplug.run.data.records import BadRecords, answer_list, image_source
from mplug.run.data.samples import read_samples
from mplug.run.data.text import check_vocabulary
from mplug.run.data.transforms import FINETUNE_SCALE, PRETRAIN_SCALE, eval_transform, train_transform
from mplug.run.run_config import TASKS, build_model_config

SPLITS = ("train", "test")


class TaskDataset(Dataset):
    """Samples of one task's split; ``set_epoch`` picks the augmentation (a pure function of seed, epoch and index)."""

    def __init__(self, task: str, split: str, cfg: dict, tokenizer, skip_bad_records: bool = False):
        bad = BadRecords(skip_bad_records)
        self.task, self.split, self.tokenizer, self.epoch = task, split, tokenizer, 0
        self.skip_bad_records = skip_bad_records
        self.seed, self.image_size, self.max_tokens = cfg["seed"], cfg["image_size"], cfg["max_tokens"]
        self.max_pixels = cfg.get("max_image_pixels", DEFAULT_MAX_PIXELS)
        self.samples = read_samples(task, split, cfg, bad)
        self.skipped, self.skipped_reasons = len(bad.reasons), bad.reasons
        if not self.samples:
            raise ValueError(f"the {task} {split} data has no usable records ({self.skipped} skipped)")
        self.prompt = training_prompt(cfg["prompt"]) if task == "caption" else ""
        self.scst = bool(cfg.get("scst", False)) and task == "caption"
        self.prompt_mode = cfg.get("prompt_mode", "authors")
        self.prompt_ids = self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        # generation (test, SCST) starts from the prompt ids every training caption of the mode starts with
        self.generation_ids = [tokenizer.cls_token_id, *generation_prompt_ids(tokenizer, self.prompt, self.prompt_mode)]
        if len(self.prompt_ids) + 2 >= self.max_tokens:
            raise ValueError(f"prompt {cfg['prompt']!r} is {len(self.prompt_ids)} tokens; max_tokens = {self.max_tokens} "
                             "must exceed it by 2 or more")

    def set_epoch(self, epoch: int) -> None:
        """Use epoch's augmentation (and pretraining caption choice) from now on."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def rng(self, index: int) -> random.Random:
        """The random stream of sample index in this epoch."""
        return random.Random(f"{self.seed}:{self.epoch}:{index}")

    def load_image(self, index: int, rng: random.Random, path=None) -> torch.Tensor:
        """Sample index's image (or its image at ``path``) -> [3, S, S] (training: augmented by rng; test: resized)."""
        image = self.open_image(index, path)
        if self.split == "test":
            return eval_transform(image, self.image_size)
        scale = PRETRAIN_SCALE if self.task == "pretrain" else FINETUNE_SCALE
        return train_transform(image, self.image_size, rng, scale)

    def open_image(self, index: int, path=None):
        """Sample index's image (or its image at ``path``) decoded as RGB; BadImage names the record."""
        sample = self.samples[index]
        try:
            return open_rgb(sample["image"] if path is None else path, self.max_pixels)
        except BadImage as error:
            raise BadImage(f"{image_source(sample)}: {error}") from None

    def __getitem__(self, index: int) -> Dict:
        rng = self.rng(index)
        sample = self.samples[index]
        item = {key: value for key, value in sample.items() if key not in ("image", "images", "source")}
        try:
            if "images" in sample:
                image = torch.stack([self.load_image(index, rng, path) for path in sample["images"]])
            else:
                image = self.load_image(index, rng)
        except BadImage as error:
            if not self.skip_bad_records:
                raise
            return bad_item(index, str(error))  # the collate drops it (mplug.run.data.bad_images)
        if self.task == "nlvr" and self.split == "train":
            image, item["sentence"] = nlvr_swap(image, item["sentence"], rng)
        item.update(image=image, index=index, file=str(sample["source"][0]), record=sample["source"][1])
        if "captions" in item and self.split == "train":
            item["caption"] = rng.choice(item["captions"])
        return item

    def tokens(self, texts: List[str]):
        """Texts -> ("[CLS] .. [SEP]" ids long [N, L], bool mask [N, L]), right-padded to the longest, <= max_tokens."""
        encoded = self.tokenizer(list(texts), padding="longest", truncation=True, max_length=self.max_tokens, return_tensors="pt")
        return encoded["input_ids"], encoded["attention_mask"].bool()

    def collate(self, items: List[Dict]) -> Dict:
        """Items -> {"inputs": the model method's keyword arguments, "meta": ids, "dropped": the items whose image
        could not be used (skip_bad_records)}; inputs and meta are None when every item was dropped."""
        items, dropped = split_items(items)
        if not items:
            return {"inputs": None, "meta": None, "dropped": dropped}
        images = torch.stack([item["image"] for item in items])
        return {**getattr(self, f"_collate_{self.task}_{self.split}")(items, images), "dropped": dropped}

    def _collate_vqa_train(self, items, images):
        question_ids, question_mask = self.tokens([item["question"] for item in items])
        answer_ids, answer_mask = self.tokens([answer for item in items for answer in item["answers"]])
        weights = torch.tensor([weight for item in items for weight in item["weights"]], dtype=torch.float32)
        counts = torch.tensor([len(item["answers"]) for item in items], dtype=torch.long)
        inputs = dict(images=images, question_ids=question_ids, question_mask=question_mask, answer_ids=answer_ids,
                      answer_mask=answer_mask, weights=weights, answers_per_question=counts)
        return {"inputs": inputs, "meta": _indices(items)}

    def _collate_vqa_test(self, items, images):
        question_ids, question_mask = self.tokens([item["question"] for item in items])
        meta = {"question_id": [item["question_id"] for item in items], "answers": [item["answers"] for item in items]}
        return {"inputs": dict(images=images, question_ids=question_ids, question_mask=question_mask), "meta": meta}

    def _collate_caption_train(self, items, images):
        if self.scst:  # mplug.run.scst.ScstLoss: the images, each one's reference sentences, the prompt
            inputs = dict(images=images, references=[item["references"] for item in items])
            if self.prompt_ids:
                inputs["prompt_ids"] = torch.tensor([self.generation_ids] * len(items))
            return {"inputs": inputs, "meta": _indices(items)}
        vatex = self.prompt_mode == "vatex"  # authors_options.PROMPT_MODES: where the prompt joins and if it is learnt
        texts = [f"{self.prompt}{' ' if vatex else ''}{item['caption']}".strip() for item in items]
        caption_ids, caption_mask = self.tokens(texts)
        prompt_length = len(self.prompt_ids) if vatex else 0
        inputs = dict(images=images, caption_ids=caption_ids, caption_mask=caption_mask, prompt_length=prompt_length)
        return {"inputs": inputs, "meta": _indices(items)}

    def _collate_caption_test(self, items, images):
        inputs = {"images": images}
        if self.prompt_ids:
            inputs["prompt_ids"] = torch.tensor([self.generation_ids] * len(items), dtype=torch.long)
        meta = {"image_id": [item["image_id"] for item in items], "references": [item["references"] for item in items]}
        return {"inputs": inputs, "meta": meta}

    def _collate_retrieval_train(self, items, images):
        text_ids, text_mask = self.tokens([item["caption"] for item in items])
        image_ids = torch.tensor([self.image_numbers[item["image_id"]] for item in items], dtype=torch.long)
        return {"inputs": dict(images=images, text_ids=text_ids, text_mask=text_mask, image_ids=image_ids), "meta": _indices(items)}

    def _collate_retrieval_test(self, items, images):
        meta = {"image_index": [item["index"] for item in items], "text_ids": [self.img2txt[item["index"]] for item in items]}
        return {"inputs": {"images": images}, "meta": meta}

    def _collate_pretrain_train(self, items, images):
        text_ids, text_mask = self.tokens([item["caption"] for item in items])
        return {"inputs": dict(images=images, text_ids=text_ids, text_mask=text_mask), "meta": _indices(items)}


    def _collate_classification(self, items, images):
        """ve / nlvr: train -> the loss's inputs with labels; test -> the predict method's inputs, labels in meta."""
        text_ids, text_mask = self.tokens([item["sentence"] for item in items])
        inputs = dict(images=images, text_ids=text_ids, text_mask=text_mask)
        labels = [item["label"] for item in items]
        if self.split == "train":
            return {"inputs": {**inputs, "labels": torch.tensor(labels, dtype=torch.long)}, "meta": _indices(items)}
        return {"inputs": inputs, "meta": {**_sources(items), "label": labels}}

    _collate_ve_train = _collate_ve_test = _collate_nlvr_train = _collate_nlvr_test = _collate_classification

    def _collate_grounding_train(self, items, images):
        text_ids, text_mask = self.tokens([item["text"] for item in items])
        boxes = torch.tensor([item["box"] for item in items], dtype=torch.float32)
        return {"inputs": dict(images=images, text_ids=text_ids, text_mask=text_mask, boxes=boxes), "meta": _indices(items)}

    def _collate_grounding_test(self, items, images):
        text_ids, text_mask = self.tokens([item["text"] for item in items])
        meta = {**_sources(items), "box": [item["box"] for item in items]}
        return {"inputs": dict(images=images, text_ids=text_ids, text_mask=text_mask), "meta": meta}


def _sources(items) -> Dict:
    """The annotation file and record index of each item (the ids of the ve / nlvr / grounding results)."""
    return {"file": [item["file"] for item in items], "record": [item["record"] for item in items]}


def _indices(items) -> Dict:
    return {"index": [item["index"] for item in items]}


class GroundingDataset(TaskDataset):
    """Grounding samples letterboxed as the authors' (grounding_dataset.py:345-384): training augmented
    (mplug.run.data.grounding_augment.augment_train: the box and, after a flip, the query move with the image), test
    by letterbox_eval; item "box" is the normalised (cx, cy, w, h) in the square. The padding mask is not passed on:
    MPLUG.grounding_loss / ground attend to every visual token, as the authors' model_grounding_mplug.py:122 does
    (image_atts all ones), so padding is seen as the zero (mean-coloured) pixels it is."""

    def __init__(self, task: str, split: str, cfg: dict, tokenizer, skip_bad_records: bool = False):
        super().__init__(task, split, cfg, tokenizer, skip_bad_records)
        self.augment = Augment.from_config(cfg)

    def load_image(self, index: int, rng: random.Random, path=None):
        """Sample index's decoded RGB image (__getitem__ letterboxes it with its box and query)."""
        return self.open_image(index, path)

    def __getitem__(self, index: int) -> Dict:
        item = super().__getitem__(index)
        if BAD in item:
            return item
        image = item["image"]
        box = pixel_box(item["box"], image.width, image.height)
        if self.split == "train":
            letterboxed, item["text"] = augment_train(image, box, item["text"], self.image_size, self.rng(index), self.augment)
        else:
            letterboxed = letterbox_eval(image, box, self.image_size)
        item.update(image=letterboxed.image, box=letterboxed.box.tolist())
        return item


class RetrievalTrainDataset(TaskDataset):
    """Retrieval training pairs; ``image_numbers`` maps each image id to 0, 1, .. in order of first appearance."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.image_numbers = {}
        for sample in self.samples:
            self.image_numbers.setdefault(sample["image_id"], len(self.image_numbers))


class RetrievalTestDataset(TaskDataset):
    """Retrieval test images; ``texts`` every caption, ``img2txt[i]`` the indices of image i's texts, ``txt2img[t]``
    the image of text t."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.texts, self.img2txt, self.txt2img = [], [], []
        for image_index, sample in enumerate(self.samples):
            self.img2txt.append(list(range(len(self.texts), len(self.texts) + len(sample["captions"]))))
            self.txt2img += [image_index] * len(sample["captions"])
            self.texts += sample["captions"]

    def text_inputs(self) -> Dict[str, torch.Tensor]:
        """Every text at once: {"text_ids" long [Nt, L], "text_mask" bool [Nt, L]} for MPLUG.retrieval_scores."""
        text_ids, text_mask = self.tokens(self.texts)
        return {"text_ids": text_ids, "text_mask": text_mask}


class VQATestDataset(TaskDataset):
    """VQA test questions; ``answer_list`` the candidate answers of the config's answer-list JSON."""

    def __init__(self, task, split, cfg, *args, **kw):
        super().__init__(task, split, cfg, *args, **kw)
        self.answer_list = answer_list(cfg)


def build_dataset(task: str, split: str, cfg: dict, tokenizer, skip_bad_records: bool = False) -> TaskDataset:
    """The data set of task ("vqa", "caption", "retrieval", "pretrain", "ve", "nlvr", "grounding") and split ("train", "test"; pretraining has
    no test split) from cfg's files; bad records raise ValueError("<file>: record <i>: ..") or, with
    skip_bad_records, are dropped and counted (``dataset.skipped``, ``dataset.skipped_reasons``). The tokenizer must
    fit cfg's model (mplug.run.data.text.check_vocabulary)."""
    if task not in TASKS or split not in SPLITS or (task, split) == ("pretrain", "test"):
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS} (pretrain has no test split), got {task!r}, {split!r}")
    check_vocabulary(tokenizer, build_model_config(cfg))
    kind = {("retrieval", "train"): RetrievalTrainDataset, ("retrieval", "test"): RetrievalTestDataset,
            ("vqa", "test"): VQATestDataset, ("grounding", "train"): GroundingDataset,
            ("grounding", "test"): GroundingDataset}.get((task, split), TaskDataset)
    return kind(task, split, cfg, tokenizer, skip_bad_records)
