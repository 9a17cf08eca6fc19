"""Pretraining objectives (mplug.tasks.objectives) against direct transcriptions of the math."""
import math

import pytest
import torch
import torch.nn.functional as F

from mplug.tasks.objectives import (
    IGNORE_INDEX,
    enqueue,
    global_token_mean,
    itc_loss,
    mask_tokens,
    prefix_split,
    random_prefix_lengths,
    sample_hard_negatives,
)

CLS, SEP, MASK, PAD = 101, 102, 103, 0


def normalised(*shape, seed):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def direct_itc(image_feat, text_feat, temp, image_queue, text_queue):
    """-log of the positive's softmax share, per row, written out with exp and sums."""
    total = 0.0
    batch = image_feat.shape[0]
    for i in range(batch):
        for query, own_bank, queue in ((image_feat[i], text_feat, text_queue), (text_feat[i], image_feat, image_queue)):
            scores = [float(query @ own_bank[j]) / temp for j in range(batch)]
            scores += [float(query @ queue[:, j]) / temp for j in range(queue.shape[1])]
            total += -(scores[i] - math.log(sum(math.exp(s) for s in scores)))
    return total / (2 * batch)


@pytest.mark.parametrize("batch,queue_size", [(1, 0), (4, 0), (4, 6), (7, 16)])
def test_itc_loss_matches_direct_math(batch, queue_size):
    image_feat, text_feat = normalised(batch, 8, seed=1), normalised(batch, 8, seed=2)
    image_queue, text_queue = normalised(queue_size, 8, seed=3).t(), normalised(queue_size, 8, seed=4).t()
    queues_before = image_queue.clone(), text_queue.clone()
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    queues = (image_queue, text_queue) if queue_size else (None, None)
    loss, sim_i2t, sim_t2i = itc_loss(image_feat, text_feat, temp, *queues)
    assert loss.item() == pytest.approx(direct_itc(image_feat, text_feat, 0.07, image_queue, text_queue), rel=1e-6)
    assert sim_i2t.shape == sim_t2i.shape == (batch, batch + queue_size)
    torch.testing.assert_close(sim_i2t[:, :batch], image_feat @ text_feat.t() / temp)
    loss.backward()
    assert temp.grad is not None and (temp.grad != 0) == (batch + queue_size > 1)
    assert torch.equal(image_queue, queues_before[0]) and torch.equal(text_queue, queues_before[1])


def test_itc_gradient_matches_autograd_of_direct_formula():
    image_feat = normalised(5, 8, seed=5).requires_grad_()
    text_feat = normalised(5, 8, seed=6).requires_grad_()
    queue = normalised(3, 8, seed=7).t()
    loss, _, _ = itc_loss(image_feat, text_feat, torch.tensor(0.1, dtype=torch.float64), queue, queue)
    grads = torch.autograd.grad(loss, (image_feat, text_feat))
    image_scores = image_feat @ torch.cat([text_feat.t(), queue], 1) / 0.1
    text_scores = text_feat @ torch.cat([image_feat.t(), queue], 1) / 0.1
    expected_loss = -(image_scores.log_softmax(1).diagonal().mean() + text_scores.log_softmax(1).diagonal().mean()) / 2
    expected = torch.autograd.grad(expected_loss, (image_feat, text_feat))
    torch.testing.assert_close(grads, expected)


def test_enqueue_wraps_and_moves_pointer():
    image_queue, text_queue = torch.zeros(4, 5), torch.zeros(4, 5)
    pointer = torch.tensor([3])
    image_feat, text_feat = torch.randn(3, 4), torch.randn(3, 4)
    enqueue(image_queue, text_queue, pointer, image_feat, text_feat)
    for row, slot in enumerate([3, 4, 0]):
        assert torch.equal(image_queue[:, slot], image_feat[row]) and torch.equal(text_queue[:, slot], text_feat[row])
    assert torch.equal(image_queue[:, 1:3], torch.zeros(4, 2))
    assert int(pointer) == 1


def test_hard_negatives_follow_softmax_without_the_positive():
    similarity = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 2
    generator = torch.Generator().manual_seed(1)
    draws = torch.stack([sample_hard_negatives(similarity, generator) for _ in range(2000)])
    assert not (draws == torch.arange(4)).any()
    expected = torch.softmax(similarity, 1).fill_diagonal_(0)
    expected = expected / expected.sum(1, keepdim=True)
    for row in range(4):
        frequency = torch.bincount(draws[:, row], minlength=4).double() / len(draws)
        torch.testing.assert_close(frequency, expected[row].double(), atol=0.035, rtol=0)


def test_hard_negatives_skip_pairs_of_the_same_image_id():
    similarity = torch.randn(4, 4, generator=torch.Generator().manual_seed(2)) * 2
    ids = torch.tensor([0, 0, 1, 2])
    generator = torch.Generator().manual_seed(3)
    draws = torch.stack([sample_hard_negatives(similarity, generator, ids) for _ in range(1000)])
    same = ids[None, :] == ids[:, None]
    expected = torch.softmax(similarity, 1).masked_fill(same, 0)
    expected = expected / expected.sum(1, keepdim=True)
    for row in range(4):
        frequency = torch.bincount(draws[:, row], minlength=4).double() / len(draws)
        torch.testing.assert_close(frequency, expected[row].double(), atol=0.05, rtol=0)
    assert not same.gather(1, draws.t()).any()


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (3,)])
def test_hard_negatives_need_a_square_batch_of_two(shape):
    with pytest.raises(ValueError, match="B >= 2"):
        sample_hard_negatives(torch.randn(*shape))


def texts(batch, length, seed, vocab=1000):
    """Random right-padded [CLS] w.. [SEP] texts with 1..length-2 words -> ids, mask."""
    generator = torch.Generator().manual_seed(seed)
    words = torch.randint(1, length - 1, (batch,), generator=generator)
    ids = torch.randint(1000 - vocab + 200, 1000, (batch, length), generator=generator)
    positions = torch.arange(length)[None, :]
    ids = torch.where(positions == 0, CLS, ids)
    ids = torch.where(positions == words[:, None] + 1, SEP, ids)
    mask = positions <= words[:, None] + 1
    return ids.masked_fill(~mask, PAD), mask


def test_mask_tokens_statistics_and_bookkeeping():
    ids, mask = texts(400, 30, seed=0)
    before = ids.clone()
    masked, labels = mask_tokens(
        ids, mask, vocab_size=1000, mask_token_id=MASK, special_ids=[CLS, SEP, PAD], generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(ids, before)
    picked = labels != IGNORE_INDEX
    eligible = mask & (ids != CLS) & (ids != SEP)
    assert not (picked & ~eligible).any()
    assert torch.equal(labels[picked], ids[picked])
    assert torch.equal(masked[~picked], ids[~picked])
    assert picked.sum() / eligible.sum() == pytest.approx(0.15, abs=0.01)
    share_masked = (masked[picked] == MASK).double().mean()
    share_kept = (masked[picked] == ids[picked]).double().mean()
    assert share_masked == pytest.approx(0.8, abs=0.03)
    assert share_kept == pytest.approx(0.1 + 0.1 / 1000, abs=0.02)
    assert (masked >= 0).all() and (masked < 1000).all()


def test_every_row_with_a_maskable_token_gets_a_label():
    """At probability 0.01 most rows draw no token; each still gets exactly one, uniform over its words, and a row of
    only special tokens gets none."""
    ids = torch.tensor([[CLS, 500, 501, 502, 503, SEP, PAD]] * 4000 + [[CLS, SEP, PAD, PAD, PAD, PAD, PAD]])
    mask = ids != PAD
    _, labels = mask_tokens(
        ids, mask, vocab_size=1000, mask_token_id=MASK, special_ids=[CLS, SEP, PAD], probability=0.01,
        generator=torch.Generator().manual_seed(3),
    )
    picked = labels != IGNORE_INDEX
    assert not picked[-1].any()
    counts = picked[:-1].sum(1)
    assert (counts >= 1).all() and (counts == 1).double().mean() > 0.9
    single = picked[:-1][counts == 1]
    frequency = single.double().mean(0)[1:5]
    torch.testing.assert_close(frequency, torch.full((4,), 0.25, dtype=torch.float64), atol=0.03, rtol=0)


def test_mask_tokens_is_reproducible_with_a_generator():
    ids, mask = texts(8, 20, seed=1)
    settings = dict(vocab_size=1000, mask_token_id=MASK, special_ids=[CLS, SEP, PAD])
    first = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(5), **settings)
    second = mask_tokens(ids, mask, generator=torch.Generator().manual_seed(5), **settings)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("probability", [0.0, 1.0, -0.1])
def test_mask_probability_must_be_a_fraction(probability):
    ids, mask = texts(2, 8, seed=2)
    with pytest.raises(ValueError, match="mlm probability"):
        mask_tokens(ids, mask, vocab_size=1000, mask_token_id=MASK, special_ids=[CLS], probability=probability)


def split_one(ids, words, prefix):
    """One text split by hand: (prefix ids, decoder input, labels) as lists."""
    tokens = ids[1 : words + 1]
    return [CLS] + tokens[:prefix] + [SEP], [CLS] + tokens[prefix:], tokens[prefix:] + [SEP]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_prefix_split_matches_a_loop(seed):
    ids, mask = texts(9, 12, seed=seed)
    prefix_lengths = random_prefix_lengths(mask, torch.Generator().manual_seed(seed))
    prefix_ids, prefix_mask, decoder_ids, decoder_mask, labels = prefix_split(
        ids, mask, prefix_lengths, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD
    )
    for row in range(len(ids)):
        words = int(mask[row].sum()) - 2
        assert 0 <= int(prefix_lengths[row]) < words
        prefix, decoder_input, target = split_one(ids[row].tolist(), words, int(prefix_lengths[row]))
        assert prefix_ids[row][prefix_mask[row]].tolist() == prefix
        assert prefix_mask[row].tolist() == [True] * len(prefix) + [False] * (prefix_mask.shape[1] - len(prefix))
        assert decoder_ids[row][decoder_mask[row]].tolist() == decoder_input
        assert decoder_mask[row].tolist() == [True] * len(decoder_input) + [False] * (decoder_mask.shape[1] - len(decoder_input))
        assert labels[row][labels[row] != IGNORE_INDEX].tolist() == target
        assert (labels[row] != IGNORE_INDEX).tolist() == decoder_mask[row].tolist()
    assert (prefix_ids[~prefix_mask] == PAD).all() and (decoder_ids[~decoder_mask] == PAD).all()


def test_prefix_lengths_out_of_range_are_rejected():
    ids, mask = texts(3, 10, seed=3)
    words = mask.sum(1) - 2
    with pytest.raises(ValueError, match="prefix_lengths"):
        prefix_split(ids, mask, words, bos_token_id=CLS, eos_token_id=SEP, pad_token_id=PAD)


def test_global_token_mean_ignores_unlabelled_tokens_in_one_process():
    losses = torch.tensor([[1.0, 2.0, 30.0], [4.0, 50.0, 60.0]])
    labels = torch.tensor([[5, 6, IGNORE_INDEX], [7, IGNORE_INDEX, IGNORE_INDEX]])
    assert global_token_mean(losses, labels).item() == pytest.approx(7.0 / 3)
