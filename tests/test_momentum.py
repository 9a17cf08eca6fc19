"""Momentum distillation (pretrain_losses(distill=True)) against the ALBEF formulas transcribed in float64, pair by pair."""
import pytest
import torch
import torch.nn.functional as F

from mplug import MPLUG, MPLUGConfig
from mplug.tasks.momentum import MOMENTUM_MODULES, ramped_alpha
from mplug.tasks.objectives import IGNORE_INDEX, prefix_split
from test_model_tasks import CLS, PAD, SEP, batch, fixed_choices

ALPHA = 0.3


def momentum_parameters(model):
    return {name: p for name, p in model.named_parameters() if name.split(".")[0].endswith("_m")}


@pytest.fixture(scope="module")
def student():
    """Tiny float64 model whose momentum copies differ from the online weights (as after some training)."""
    torch.manual_seed(2)
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval().add_momentum_copies()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in momentum_parameters(model).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def features(model, images, ids, mask, suffix=""):
    """Normalised ITC features of the online (suffix "") or momentum ("_m") model."""
    part = lambda name: getattr(model, name + suffix)
    image = F.normalize(part("vision_proj")(part("visual_encoder")(images)[:, 0]), dim=-1)
    text = F.normalize(part("text_proj")(part("text_encoder")(ids, mask)[:, 0]), dim=-1)
    return image, text


@torch.no_grad()
def test_distilled_itc_is_the_albef_formula(student):
    images, ids, mask = batch(3, seed=21)
    loss = student.pretrain_losses(images, ids, mask, objectives=("itc",), alpha=ALPHA, update_queue=False)["itc"]
    image, text = features(student, images, ids, mask)
    image_m, text_m = features(student, images, ids, mask, "_m")
    temp = float(student.temp.clamp(0.001, 0.5))
    total = 0.0
    for i in range(3):
        for query, query_m, batch_bank, queue in ((image[i], image_m[i], text_m, student.text_queue), (text[i], text_m[i], image_m, student.image_queue)):
            bank = [batch_bank[j] for j in range(3)] + [queue[:, j] for j in range(queue.shape[1])]
            scores = torch.stack([query @ entry for entry in bank]) / temp
            scores_m = torch.stack([query_m @ entry for entry in bank]) / temp
            target = ALPHA * scores_m.softmax(0) + (1 - ALPHA) * F.one_hot(torch.tensor(i), len(bank))
            total = total - (target * scores.log_softmax(0)).sum()
    torch.testing.assert_close(loss, total / 6)


def fused_text(model, images, ids, mask, suffix=""):
    part = lambda name: getattr(model, name + suffix)
    return part("fusion_encoder")(part("visual_encoder")(images), None, part("text_encoder")(ids, mask), mask)


@torch.no_grad()
def test_distilled_mlm_and_prefix_lm_mix_in_the_momentum_probabilities(student):
    images, ids, mask = batch(2, seed=22)
    (masked_ids, labels), prefix_lengths = fixed_choices(ids, mask)
    losses = student.pretrain_losses(
        images, ids, mask, objectives=("mlm", "prefix_lm"), mlm_inputs=(masked_ids, labels),
        prefix_lengths=prefix_lengths, alpha=ALPHA, update_queue=False,
    )
    mlm_terms, prefix_terms = [], []
    prefix_ids, prefix_mask, decoder_ids, decoder_mask, decoder_labels = prefix_split(
        ids, mask, prefix_lengths, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD
    )
    for i in range(2):
        one = lambda x: x[i : i + 1]
        log_p = student.mlm_head(fused_text(student, one(images), one(masked_ids), one(mask))[1])[0].log_softmax(-1)
        p_m = student.mlm_head_m(fused_text(student, one(images), one(masked_ids), one(mask), "_m")[1])[0].softmax(-1)
        for t in (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist():
            mlm_terms.append((1 - ALPHA) * -log_p[t, labels[i, t]] + ALPHA * -(p_m[t] * log_p[t]).sum())
        length = int(decoder_mask[i].sum())
        decoder_input = decoder_ids[i : i + 1, :length]
        memory = fused_text(student, one(images), one(prefix_ids), one(prefix_mask))
        memory_m = fused_text(student, one(images), one(prefix_ids), one(prefix_mask), "_m")
        log_q = student.text_decoder(decoder_input, None, memory=memory, memory_masks=(None, one(prefix_mask)))[0].log_softmax(-1)
        q_m = student.text_decoder_m(decoder_input, None, memory=memory_m, memory_masks=(None, one(prefix_mask)))[0].softmax(-1)
        for t in range(length):
            prefix_terms.append((1 - ALPHA) * -log_q[t, decoder_labels[i, t]] + ALPHA * -(q_m[t] * log_q[t]).sum())
    torch.testing.assert_close(losses["mlm"], torch.stack(mlm_terms).mean())
    torch.testing.assert_close(losses["prefix_lm"], torch.stack(prefix_terms).mean())


@torch.no_grad()
def test_itm_negatives_come_from_online_against_momentum_similarity(student):
    images, ids, mask = batch(4, seed=23)
    loss = student.pretrain_losses(images, ids, mask, objectives=("itm",), generator=torch.Generator().manual_seed(5), update_queue=False)["itm"]
    image, text = features(student, images, ids, mask)
    image_m, text_m = features(student, images, ids, mask, "_m")
    temp = student.temp.clamp(0.001, 0.5)
    generator = torch.Generator().manual_seed(5)
    draws = [torch.multinomial(torch.softmax(sim / temp, 1).fill_diagonal_(0), 1, generator=generator).flatten()
             for sim in (image @ text_m.t(), text @ image_m.t())]
    pairs = [(i, i, 1) for i in range(4)] + [(i, int(draws[0][i]), 0) for i in range(4)] + [(int(draws[1][j]), j, 0) for j in range(4)]
    terms = []
    for i, j, matched in pairs:
        _, fused = student.fusion_encoder(student.visual_encoder(images[i : i + 1]), None, student.text_encoder(ids[j : j + 1], mask[j : j + 1]), mask[j : j + 1])
        terms.append(-student.itm_head(fused[:, 0]).log_softmax(-1)[0, matched])
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_training_step_moves_the_copies_and_queues_momentum_features_with_ids():
    torch.manual_seed(4)
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().add_momentum_copies().train()
    with torch.no_grad():
        for p in momentum_parameters(model).values():
            p.mul_(0.5)
    before = {name: p.detach().clone() for name, p in momentum_parameters(model).items()}
    online = dict(model.named_parameters())
    images, ids, mask = batch(3, seed=24)
    image_ids = torch.tensor([7, 7, 9])
    pointer = int(model.queue_ptr)
    model.pretrain_losses(images, ids, mask, objectives=("itc",), image_ids=image_ids)
    for name, p in momentum_parameters(model).items():
        online_name = name.replace("_m.", ".", 1)
        torch.testing.assert_close(p.detach(), 0.995 * before[name] + 0.005 * online[online_name].detach(), msg=name)
    with torch.no_grad():
        image_m, text_m = features(model, images, ids, mask, "_m")
    slots = (pointer + torch.arange(3)) % model.config.queue_size
    torch.testing.assert_close(model.image_queue[:, slots], image_m.t())
    torch.testing.assert_close(model.text_queue[:, slots], text_m.t())
    assert model.idx_queue[0, slots].tolist() == [7, 7, 9]


@torch.no_grad()
def test_same_image_id_pairs_are_all_itc_positives():
    """distill=False, ids (3, 3, 5), queue ids (5, -1, 3, ...): a row's target is an equal share on every same-id entry."""
    torch.manual_seed(5)
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference", queue_size=4)).double().eval()
    model.idx_queue.copy_(torch.tensor([[5, -1, 3, 8]]))
    images, ids, mask = batch(3, seed=25)
    image_ids = torch.tensor([3, 3, 5])
    loss = model.pretrain_losses(images, ids, mask, objectives=("itc",), distill=False, image_ids=image_ids)["itc"]
    image, text = features(model, images, ids, mask)
    temp = float(model.temp.clamp(0.001, 0.5))
    bank_ids = [3, 3, 5, 5, -1, 3, 8]
    total = 0.0
    for i in range(3):
        for query, batch_bank, queue in ((image[i], text, model.text_queue), (text[i], image, model.image_queue)):
            bank = [batch_bank[j] for j in range(3)] + [queue[:, j] for j in range(4)]
            log_p = (torch.stack([query @ entry for entry in bank]) / temp).log_softmax(0)
            positives = [j for j, bank_id in enumerate(bank_ids) if bank_id == int(image_ids[i])]
            total = total - sum(log_p[j] for j in positives) / len(positives)
    torch.testing.assert_close(loss, total / 6)


def test_distill_false_adds_no_copies_and_default_does():
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference"))
    images, ids, mask = batch(2, seed=26, dtype=torch.float32)
    model.pretrain_losses(images, ids, mask, objectives=("itc",), distill=False)
    assert not any(hasattr(model, name + "_m") for name in MOMENTUM_MODULES)
    model.pretrain_losses(images, ids, mask, objectives=("itc",))
    assert all(hasattr(model, name + "_m") for name in MOMENTUM_MODULES)
    assert model.mlm_head_m.decoder.weight is model.text_encoder_m.embeddings.word_embeddings.weight


def test_alpha_ramps_over_the_first_epoch():
    assert [ramped_alpha(step, 100) for step in (0, 50, 100, 150)] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    assert ramped_alpha(0, 100, epoch=1) == 0.4
    with pytest.raises(ValueError, match="steps_per_epoch"):
        ramped_alpha(0, 0)


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=1.5), "alpha must be in"),
    (dict(image_ids=torch.tensor([1, 2, 3])), r"image_ids must be a long tensor \[B\] = \[2\]"),
    (dict(image_ids=torch.tensor([1, -2])), "image_ids must be >= 0"),
    (dict(image_ids=torch.tensor([4, 4]), objectives=("itm",)), "share their id with the whole batch"),
])
def test_bad_distillation_inputs_are_named(kwargs, message):
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference"))
    images, ids, mask = batch(2, seed=27, dtype=torch.float32)
    with pytest.raises(ValueError, match=message):
        model.pretrain_losses(images, ids, mask, **kwargs)
