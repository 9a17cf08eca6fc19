"""Fine-tuning objectives (mplug.tasks.finetune) and CIDEr-D (mplug.tasks.cider) against hand-computed values and float64
per-example transcriptions."""
import inspect
import math

import pytest
import torch

from mplug import MPLUG, MPLUGConfig
from mplug.tasks.cider import CiderD
from mplug.tasks.finetune import sample_captions, vqa_answer_weights
from mplug.tasks.inference import retrieval_scores
from test_model_tasks import CLS, PAD, SEP, batch

LOG2 = math.log(2)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(6)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()


def test_cider_d_unigrams_by_hand():
    """N = 2 images; every word in one image only, so idf = log 2. 'a b' vs refs 'a b' (cosine 1) and 'a c'
    (shared a: log2^2 / (sqrt2 log2)^2 = 0.5): 10 * (1 + 0.5) / 2 = 7.5. 'a' vs 'a b': 1/sqrt2 times exp(-1/72)."""
    cider = CiderD([["a b".split(), "a c".split()], ["d e".split()]], n=1)
    assert cider.score("a b".split(), ["a b".split(), "a c".split()]) == pytest.approx(7.5)
    assert cider.score(["a"], ["a b".split()]) == pytest.approx(10 * math.exp(-1 / 72) / math.sqrt(2))


def test_cider_d_four_grams_by_hand():
    """A candidate equal to its only reference scores 10 * (number of n <= 4 it has n-grams for) / 4; a word found
    in every training image has idf 0 and adds nothing."""
    cider = CiderD([["a b c d".split(), "x y".split()], ["e f".split(), "q".split()]])
    assert cider.score("a b c d".split(), ["a b c d".split()]) == pytest.approx(10.0)
    assert cider.score("x y".split(), ["x y".split()]) == pytest.approx(5.0)
    everywhere = CiderD([["w a".split()], ["w b".split()]], n=1)
    assert everywhere.score(["w"], ["w a".split()]) == 0.0
    assert everywhere.score("w a".split(), ["w a".split()]) == pytest.approx(10 * (LOG2 * LOG2) / (LOG2 * LOG2))


def test_vqa_answer_weights_as_the_authors_reader():
    assert vqa_answer_weights([["yes", "yes", "no"], ["red"]]) == (["yes", "no", "red"], [2 / 3, 1 / 3, 1.0], [2, 1])
    assert vqa_answer_weights([["two"], ["cat"]], dataset="vg") == (["two", "cat"], [0.5, 0.5], [1, 1])
    with pytest.raises(ValueError, match=r"answer_lists\[1\] is empty"):
        vqa_answer_weights([["yes"], []])


def answers():
    """Three answers "[CLS] w.. [SEP]" for two questions (2 + 1), right-padded."""
    ids = torch.tensor([[CLS, 150, SEP, PAD], [CLS, 160, 170, SEP], [CLS, 180, SEP, PAD]])
    return ids, ids != PAD, torch.tensor([0.6, 0.3, 1.0], dtype=torch.float64), [2, 1]


def answer_log_prob(model, memory, memory_mask, ids):
    """sum over t >= 1 of log p(ids[t] | ids[:t]) by the uncached decoder over one question's memory."""
    ids = ids[ids != PAD][None]
    log_probs = model.text_decoder(ids, None, memory=memory, memory_masks=(None, memory_mask))[0].log_softmax(-1)
    return sum(log_probs[t - 1, ids[0, t]] for t in range(1, ids.shape[1]))


@torch.no_grad()
def test_vqa_loss_weights_answers_sums_per_question_averages_over_questions(model):
    images, question_ids, question_mask = batch(2, seed=31)
    answer_ids, answer_mask, weights, counts = answers()
    loss = model.vqa_loss(images, question_ids, question_mask, answer_ids, answer_mask, weights, counts)
    owner, total = [0, 0, 1], 0.0
    for n, b in enumerate(owner):
        vision = model.visual_encoder(images[b : b + 1])
        memory = model.fusion_encoder(vision, None, model.text_encoder(question_ids[b : b + 1], question_mask[b : b + 1]), question_mask[b : b + 1])
        total = total - weights[n] * answer_log_prob(model, memory, question_mask[b : b + 1], answer_ids[n])
    torch.testing.assert_close(loss, total / 2)


@torch.no_grad()
def test_caption_loss_skips_the_prompt(model):
    images, ids, mask = batch(2, seed=32)
    loss = model.caption_loss(images, ids, mask, prompt_length=1)
    terms = []
    for b in range(2):
        caption = ids[b][mask[b]][None]
        log_probs = model.text_decoder(caption, None, memory=(model.visual_encoder(images[b : b + 1]),))[0].log_softmax(-1)
        terms += [-log_probs[t - 1, caption[0, t]] for t in range(2, caption.shape[1])]  # token 1 is the prompt
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def caption_words(ids, length):
    words = ids[:length].tolist()
    return words[: words.index(SEP)] if SEP in words else words


def caption_log_prob(model, image, words):
    ids = torch.tensor([[CLS, *words, SEP]])
    log_probs = model.text_decoder(ids, None, memory=(model.visual_encoder(image[None]),))[0].log_softmax(-1)
    return sum(log_probs[t - 1, ids[0, t]] for t in range(1, ids.shape[1]))


# references sharing n-grams with what the seeded tiny model writes (58 197 98 87 ...), so rewards are not all 0
REFERENCES = [[[58, 197, 195, 77], [58, 150]], [[197, 98, 87, 42], [170, 171]]]
CIDER = CiderD(REFERENCES + [[[58, 199]], [[110, 111]]])


@torch.no_grad()
def test_scst_with_beams_and_mean_baseline(model):
    images, _, _ = batch(2, seed=33)
    loss, rewards = model.caption_scst_loss(images, REFERENCES, CIDER, num_samples=3, baseline="mean", sampling="beam", min_length=1, max_length=5)
    beams = model.caption_generate(images, num_beams=3, num_return_sequences=3, min_length=1, max_length=5)
    expected_rewards, terms = [], []
    for b in range(2):
        captions = [caption_words(beams.sequences[b, k], int(beams.lengths[b, k])) for k in range(3)]
        row = [CIDER.score(c, REFERENCES[b]) for c in captions]
        expected_rewards.append(row)
        mean = sum(row) / 3
        terms += [-(r - mean) * caption_log_prob(model, images[b], c) for r, c in zip(row, captions)]
    torch.testing.assert_close(rewards, torch.tensor(expected_rewards, dtype=torch.float64))
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    assert len({round(r, 6) for row in expected_rewards for r in row}) > 2 and float(loss) != 0.0


@torch.no_grad()
def test_sampled_captions_follow_the_uncached_decoder(model):
    """The same generator draws the same tokens from the full-prefix decoder's probabilities, end token banned
    before min_length, pad after it."""
    images, _, _ = batch(2, seed=34)
    vision = model.visual_encoder(images)
    ids, lengths = sample_captions(model, (vision,), (None,), 2, 2, 6, torch.Generator().manual_seed(8))
    generator = torch.Generator().manual_seed(8)
    rows = [[CLS] for _ in range(4)]
    ended = [False] * 4
    for position in range(ids.shape[2]):
        memory = (vision.repeat_interleave(2, 0),)
        probs = model.text_decoder(torch.tensor(rows), None, memory=memory)[:, -1].softmax(-1)
        if position < 2:
            probs[:, SEP] = 0
        draws = torch.multinomial(probs, 1, generator=generator).flatten().tolist()
        for r in range(4):
            rows[r].append(PAD if ended[r] else draws[r])
            ended[r] = ended[r] or draws[r] == SEP
    assert ids.view(4, -1).tolist() == [row[1:] for row in rows]
    for r, row in enumerate(rows):
        assert int(lengths.view(-1)[r]) == (row.index(SEP) if SEP in row else ids.shape[2])


def test_scst_gradient_is_the_advantage_weighted_log_prob(model):
    """sampling='sample', greedy baseline: loss = -mean((cider(sample) - cider(greedy)) * log p(sample)); the rewards
    are the CIDEr-D of the captions drawn with the same generator."""
    images, _, _ = batch(2, seed=35)
    loss, rewards = model.caption_scst_loss(images, REFERENCES, CIDER, num_samples=2, min_length=1, max_length=5, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        vision = model.visual_encoder(images)
        ids, lengths = sample_captions(model, (vision,), (None,), 2, 1, 5, torch.Generator().manual_seed(9))
        greedy = model.caption_generate(images, num_beams=1, min_length=1, max_length=5)
        terms, advantages = [], []
        for b in range(2):
            base = CIDER.score(caption_words(greedy.sequences[b, 0], int(greedy.lengths[b, 0])), REFERENCES[b])
            for k in range(2):
                words = caption_words(ids[b, k], int(lengths[b, k]))
                reward = CIDER.score(words, REFERENCES[b])
                assert float(rewards[b, k]) == pytest.approx(reward)
                terms.append(-(reward - base) * caption_log_prob(model, images[b], words))
                advantages.append(reward - base)
    assert any(advantage != 0 for advantage in advantages)
    torch.testing.assert_close(loss.detach(), torch.stack(terms).mean())
    loss.backward()
    assert model.text_decoder.bert.embeddings.word_embeddings.weight.grad is not None
    model.zero_grad()


def test_retrieval_loss_is_itc_and_itm_with_image_id_positives(model):
    images, ids, mask = batch(3, seed=36)
    image_ids = torch.tensor([4, 4, 5])
    settings = dict(generator=torch.Generator().manual_seed(1), update_queue=False, distill=False)
    losses = model.retrieval_loss(images, ids, mask, image_ids, **settings)
    expected = model.pretrain_losses(images, ids, mask, objectives=("itc", "itm"), image_ids=image_ids, **dict(settings, generator=torch.Generator().manual_seed(1)))
    assert losses.keys() == {"itc", "itm"}
    torch.testing.assert_close(losses, expected)
    assert inspect.signature(retrieval_scores).parameters["k"].default == 256


@pytest.mark.parametrize("call,error,message", [
    (lambda m, im, q, qm: m.vqa_loss(im, q, qm, *answers()[:2], torch.ones(2, dtype=torch.float64), [2, 1]), ValueError, "weights must be floats"),
    (lambda m, im, q, qm: m.vqa_loss(im, q, qm, *answers()[:3], [3, 0]), ValueError, "answers_per_question must be >= 1"),
    (lambda m, im, q, qm: m.vqa_loss(im, q, qm, *answers()[:3], [1, 1]), ValueError, "answers_per_question sums to 2"),
    (lambda m, im, q, qm: m.vqa_loss(im, q, qm, *answers()[:3], [3]), ValueError, "answers_per_question has 1 entries"),
    (lambda m, im, q, qm: m.caption_scst_loss(im, None, CIDER), ValueError, "references must hold one list"),
    (lambda m, im, q, qm: m.caption_scst_loss(im, [REFERENCES[0], []], CIDER), ValueError, r"references: images \[1\]"),
    (lambda m, im, q, qm: m.caption_scst_loss(im, REFERENCES, None), TypeError, "cider must be"),
    (lambda m, im, q, qm: m.caption_scst_loss(im, REFERENCES, CIDER, baseline="best"), ValueError, "baseline must be one of"),
    (lambda m, im, q, qm: m.caption_loss(im, q, qm, prompt_length=99), ValueError, "prompt_length"),
    (lambda m, im, q, qm: m.retrieval_loss(im, q, qm, None), ValueError, "image_ids is required"),
])
def test_bad_finetuning_inputs_are_named(model, call, error, message):
    images, ids, mask = batch(2, seed=37)
    with pytest.raises(error, match=message):
        call(model, images, ids, mask)


def test_cider_needs_references():
    with pytest.raises(ValueError, match="corpus"):
        CiderD([[["a"]], []])
    with pytest.raises(ValueError, match="references must hold"):
        CiderD([[["a"]]]).score(["a"], [])
