"""mPLUG tasks on the tiny model: pretraining losses, cached vs full-prefix beam search, retrieval re-ranking."""
import pytest
import torch
import torch.nn.functional as F

from mplug import MPLUG, MPLUGConfig
from mplug.model.generation import length_penalty
from mplug.tasks.objectives import IGNORE_INDEX, prefix_split

CLS, SEP, PAD = 101, 102, 0


@pytest.fixture(scope="module")
def model():
    """The tiny model in float64 on the reference backend (exact comparisons), eval mode."""
    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()


def batch(size, length=9, seed=0, dtype=torch.float64):
    """Random images and right-padded [CLS] w.. [SEP] texts with 2..length-2 words."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 32, 32, generator=generator, dtype=dtype)
    words = torch.randint(2, length - 1, (size,), generator=generator)
    positions = torch.arange(length)[None, :]
    ids = torch.randint(104, 200, (size, length), generator=generator)
    ids = torch.where(positions == 0, CLS, torch.where(positions == words[:, None] + 1, SEP, ids))
    mask = positions <= words[:, None] + 1
    return images, ids.masked_fill(~mask, PAD), mask


def fixed_choices(ids, mask):
    """MLM inputs masking every second word, and prefixes of one word."""
    labels = ids.masked_fill((torch.arange(ids.shape[1]) % 2 == 0) | ~mask | (ids == SEP), IGNORE_INDEX)
    return (ids.masked_fill(labels != IGNORE_INDEX, 103), labels), torch.ones(len(ids), dtype=torch.long)


def test_pretrain_losses_are_finite_and_reach_every_parameter(model):
    images, ids, mask = batch(3)
    losses = model.pretrain_losses(images, ids, mask, generator=torch.Generator().manual_seed(0), update_queue=False)
    assert sorted(losses) == ["itc", "itm", "mlm", "prefix_lm"]
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())
    model.zero_grad()
    sum(losses.values()).backward()
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    untouched = [name for name, p in trained if p.grad is None or not p.grad.abs().sum() > 0]
    momentum_grads = [name for name, p in model.named_parameters() if name.split(".")[0].endswith("_m") and p.grad is not None]
    model.zero_grad()
    assert untouched == [] and momentum_grads == []
    assert len(trained) < len(list(model.named_parameters()))  # the momentum copies were added, without gradients


def test_losses_match_pair_by_pair_and_token_by_token_computation(model):
    """ITM, MLM and PrefixLM (distill=False) recomputed one pair at a time; PrefixLM through the cached one-token
    decoder path."""
    images, ids, mask = batch(3, seed=1)
    mlm_inputs, prefix_lengths = fixed_choices(ids, mask)
    losses = model.pretrain_losses(
        images, ids, mask, mlm_inputs=mlm_inputs, prefix_lengths=prefix_lengths,
        generator=torch.Generator().manual_seed(4), update_queue=False, distill=False,
    )
    with torch.no_grad():
        negatives = itm_negatives(model, images, ids, mask, torch.Generator().manual_seed(4))
        itm = -torch.stack([pair_log_prob(model, images[i], ids[j], mask[j], match) for i, j, match in negatives]).mean()
        mlm = mlm_by_hand(model, images, mask, *mlm_inputs)
        prefix_lm = prefix_lm_by_cached_decoding(model, images, ids, mask, prefix_lengths)
    torch.testing.assert_close(losses["itm"], itm)
    torch.testing.assert_close(losses["mlm"], mlm)
    torch.testing.assert_close(losses["prefix_lm"], prefix_lm)


def itm_negatives(model, images, ids, mask, generator):
    """(image, text, matched) triples: positives, then softmax-drawn negatives as the objective draws them."""
    image_feat = F.normalize(model.vision_proj(model.visual_encoder(images)[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder(ids, mask)[:, 0]), dim=-1)
    similarity = image_feat @ text_feat.t() / model.temp
    draws = []
    for sim in (similarity, similarity.t()):
        weights = torch.softmax(sim, 1).fill_diagonal_(0)
        draws.append(torch.multinomial(weights.float(), 1, generator=generator).squeeze(1))
    size = len(images)
    return (
        [(i, i, True) for i in range(size)]
        + [(i, int(draws[0][i]), False) for i in range(size)]
        + [(int(draws[1][j]), j, False) for j in range(size)]
    )


def pair_log_prob(model, image, ids, mask, matched):
    """log p(matched or not) of one image-text pair through the fused text [CLS]."""
    vision = model.visual_encoder(image[None])
    _, text = model.fusion_encoder(vision, None, model.text_encoder(ids[None], mask[None]), mask[None])
    return torch.log_softmax(model.itm_head(text[:, 0]), -1)[0, int(matched)]


def mlm_by_hand(model, images, mask, masked_ids, labels):
    total, count = 0.0, 0
    for i in range(len(images)):
        vision = model.visual_encoder(images[i : i + 1])
        _, text = model.fusion_encoder(vision, None, model.text_encoder(masked_ids[i : i + 1], mask[i : i + 1]), mask[i : i + 1])
        log_probs = torch.log_softmax(model.mlm_head(text)[0], -1)
        for position in (labels[i] != IGNORE_INDEX).nonzero().flatten().tolist():
            total, count = total - log_probs[position, labels[i, position]], count + 1
    return total / count


def prefix_lm_by_cached_decoding(model, images, ids, mask, prefix_lengths):
    prefix_ids, prefix_mask, decoder_ids, _, labels = prefix_split(
        ids, mask, prefix_lengths, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD
    )
    total, count = 0.0, 0
    for i in range(len(images)):
        vision = model.visual_encoder(images[i : i + 1])
        memory = model.fusion_encoder(vision, None, model.text_encoder(prefix_ids[i : i + 1], prefix_mask[i : i + 1]), prefix_mask[i : i + 1])
        cache = None
        for position in range(int((labels[i] != IGNORE_INDEX).sum())):
            token = decoder_ids[i : i + 1, position : position + 1]
            logits, cache = model.text_decoder(
                token, None, memory=memory, memory_masks=(None, prefix_mask[i : i + 1]), cache=cache, use_cache=True
            )
            total, count = total - torch.log_softmax(logits[0, -1], -1)[labels[i, position]], count + 1
    return total / count


def test_training_mode_enqueues_the_batch_features(model):
    images, ids, mask = batch(3, seed=2)
    queues = [buffer.clone() for buffer in (model.image_queue, model.text_queue, model.queue_ptr)]
    model.pretrain_losses(images, ids, mask, distill=False)
    assert all(torch.equal(a, b) for a, b in zip(queues, (model.image_queue, model.text_queue, model.queue_ptr)))
    model.train()
    try:
        model.pretrain_losses(images, ids, mask, distill=False)
        with torch.no_grad():
            image_feat = F.normalize(model.vision_proj(model.visual_encoder(images)[:, 0]), dim=-1)
        slots = (int(queues[2]) + torch.arange(3)) % model.config.queue_size
        torch.testing.assert_close(model.image_queue[:, slots], image_feat.t())
        assert int(model.queue_ptr) == (int(queues[2]) + 3) % model.config.queue_size
    finally:
        model.eval()
        for buffer, saved in zip((model.image_queue, model.text_queue, model.queue_ptr), queues):
            buffer.copy_(saved)


def generate(model, task, images, ids, mask, **settings):
    if task == "vqa":
        return model.vqa_generate(images, ids, mask, **settings)
    return model.caption_generate(images, **settings)


@pytest.mark.parametrize("task,settings", [
    ("vqa", dict(num_beams=5, min_length=3, max_length=10, num_return_sequences=3)),
    ("vqa", dict(num_beams=1, min_length=1, max_length=6)),
    ("caption", dict(num_beams=5, num_return_sequences=2)),
    ("caption", dict(num_beams=2, min_length=2, max_length=8, prompt_ids=torch.tensor([[CLS, 150]] * 3))),
])
def test_cached_and_full_prefix_decoding_give_identical_beams(model, task, settings):
    images, ids, mask = batch(3, seed=3)
    cached = generate(model, task, images, ids, mask, use_cache=True, **settings)
    full = generate(model, task, images, ids, mask, use_cache=False, **settings)
    assert torch.equal(cached.sequences, full.sequences)
    assert torch.equal(cached.lengths, full.lengths)
    torch.testing.assert_close(cached.scores, full.scores, rtol=1e-10, atol=1e-10)
    assert (cached.lengths > settings.get("min_length", 8 if task == "caption" else 1)).all()


def test_cached_decoding_identical_in_float32():
    torch.manual_seed(1)
    model = MPLUG(MPLUGConfig.tiny()).eval()
    images, ids, mask = batch(2, seed=4, dtype=torch.float32)
    cached = model.vqa_generate(images, ids, mask, min_length=2, num_return_sequences=5)
    full = model.vqa_generate(images, ids, mask, min_length=2, num_return_sequences=5, use_cache=False)
    assert torch.equal(cached.sequences, full.sequences)
    torch.testing.assert_close(cached.scores, full.scores)


def vqa_memory(model, images, ids, mask):
    vision = model.visual_encoder(images)
    return model.fusion_encoder(vision, None, model.text_encoder(ids, mask), mask)


@torch.no_grad()
def test_beam_scores_are_the_decoder_likelihood(model):
    images, ids, mask = batch(2, seed=5)
    output = model.vqa_generate(images, ids, mask, min_length=2, num_return_sequences=4)
    memory = vqa_memory(model, images, ids, mask)
    for example in range(2):
        for rank in range(4):
            length = int(output.lengths[example, rank])
            answer = output.sequences[example, rank, :length]
            sequence = torch.cat([torch.tensor([CLS]), answer])[None]
            example_memory = tuple(m[example : example + 1] for m in memory)
            log_probs = torch.log_softmax(model.text_decoder(sequence, None, memory=example_memory, memory_masks=(None, mask[example : example + 1])), -1)
            total = log_probs[0, torch.arange(length), answer].sum()
            torch.testing.assert_close(output.scores[example, rank], total / length_penalty(length))


@torch.no_grad()
def test_one_beam_is_greedy_decoding(model):
    images, ids, mask = batch(2, seed=6)
    output = model.vqa_generate(images, ids, mask, num_beams=1, min_length=2, max_length=7)
    memory = vqa_memory(model, images, ids, mask)
    for example in range(2):
        sequence = [CLS]
        example_memory = tuple(m[example : example + 1] for m in memory)
        while len(sequence) <= 7 and sequence[-1] != SEP or len(sequence) == 1:
            logits = model.text_decoder(torch.tensor([sequence]), None, memory=example_memory, memory_masks=(None, mask[example : example + 1]))[0, -1]
            if len(sequence) <= 2:
                logits[SEP] = float("-inf")
            sequence.append(int(logits.argmax()))
        length = int(output.lengths[example, 0])
        assert output.sequences[example, 0, :length].tolist() == sequence[1:]


@torch.no_grad()
@pytest.mark.parametrize("k,batch_size", [(2, 64), (2, 1), (10, 3)])
def test_retrieval_reranks_itc_top_k_by_itm(model, k, batch_size):
    images, ids, mask = batch(4, seed=7)
    scores = model.retrieval_scores(images, ids, mask, k=k, batch_size=batch_size)
    image_feat = F.normalize(model.vision_proj(model.visual_encoder(images)[:, 0]), dim=-1)
    text_feat = F.normalize(model.text_proj(model.text_encoder(ids, mask)[:, 0]), dim=-1)
    torch.testing.assert_close(scores.itc, image_feat @ text_feat.t())
    kept = min(k, 4)
    for query_scores, similarity, image_side in ((scores.i2t, scores.itc, True), (scores.t2i, scores.itc.t(), False)):
        for row in range(4):
            top = set(similarity[row].topk(kept).indices.tolist())
            assert set(torch.isfinite(query_scores[row]).nonzero().flatten().tolist()) == top
            for column in top:
                image, text = (row, column) if image_side else (column, row)
                _, fused = model.fusion_encoder(
                    model.visual_encoder(images[image : image + 1]), None,
                    model.text_encoder(ids[text : text + 1], mask[text : text + 1]), mask[text : text + 1],
                )
                torch.testing.assert_close(query_scores[row, column], model.itm_head(fused[:, 0])[0, 1])


@pytest.mark.parametrize("call,message", [
    (lambda m, im, ids, mask: m.vqa_generate(im[:2], ids, mask), "images has batch 2 but question_ids has batch 3"),
    (lambda m, im, ids, mask: m.pretrain_losses(im, ids[:2], mask[:2]), "images has batch 3 but text_ids has batch 2"),
    (lambda m, im, ids, mask: m.pretrain_losses(im[:1], ids[:1], mask[:1]), "B >= 2"),
    (lambda m, im, ids, mask: m.retrieval_scores(im, ids, mask, k=0), "k and batch_size must be positive"),
    (lambda m, im, ids, mask: m.caption_generate(im, min_length=30), "min_length < max_length"),
    (lambda m, im, ids, mask: m.caption_generate(im, prompt_ids=ids[:1, :2]), "prompt_ids has batch 1"),
])
def test_bad_task_inputs_are_named(model, call, message):
    images, ids, mask = batch(3, seed=8)
    with pytest.raises(ValueError, match=message):
        call(model, images, ids, mask)
