"""SCST as the authors train it (AliceMind mPLUG/caption_mplug_scst.py:55-90): the loss on a hand-worked example,
gradients through the beam search, the batch-reference CIDEr-D reward, the shipped SCST configs and the CLI."""
import math

import pytest
import torch

from mplug import MPLUG, MPLUGConfig
from mplug.run import caption_eval
from mplug.run.run_config import load_config
from mplug.run.scst import cider_rewards, ptb_cider_rewards
from mplug.tasks.inference import _generate
from mplug.tasks.pretraining import encode_images
from mplug.tasks.scst import authors_scst_loss, authors_scst_objective, beam_ids

needs_java = pytest.mark.skipif(caption_eval.unavailable_reason() is not None, reason=str(caption_eval.unavailable_reason()))


def test_objective_by_hand():
    # caption_mplug_scst.py:84-87: reward_baseline = mean over the beams; loss = -(probs / words) * (reward - baseline).
    scores = torch.tensor([[-2.0, -3.0, -1.2], [-1.0, -2.0, -6.0]], dtype=torch.float64, requires_grad=True)
    counts = torch.tensor([[4, 6, 3], [2, 4, 6]])
    rewards = torch.tensor([[0.9, 0.0, 0.3], [2.0, 1.0, 0.0]], dtype=torch.float64)
    # Image 0: baseline 0.4, advantages 0.5, -0.4, -0.1; per-token scores -0.5, -0.5, -0.4 -> terms 0.25, -0.2, -0.04.
    # Image 1: baseline 1.0, advantages 1, 0, -1; per-token scores -0.5, -0.5, -1.0 -> terms 0.5, 0, -1.0.
    loss = authors_scst_objective(scores, counts, rewards)
    assert loss.item() == pytest.approx((0.25 - 0.2 - 0.04 + 0.5 + 0.0 - 1.0) / 6, rel=1e-12)
    loss.backward()
    # d loss / d score = -advantage / (count x 6)
    expected = torch.tensor([[-0.5 / 24, 0.4 / 36, 0.1 / 18], [-1 / 12, 0.0, 1 / 36]], dtype=torch.float64)
    assert torch.allclose(scores.grad, expected, rtol=1e-12, atol=0)


def test_loss_is_the_objective_of_the_authors_search_with_gradients():
    torch.manual_seed(0)
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()
    images = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def reward(ids):
        return torch.tensor([[float(len(set(beam))) for beam in row] for row in ids], dtype=torch.float64)

    loss, rewards = authors_scst_loss(model, images, reward, num_beams=3, min_length=2, max_length=6)
    with torch.no_grad():
        embeds, mask = encode_images(model, images)
        prompt = torch.full((2, 1), model.config.bos_token_id)
        beams = _generate(model, (embeds,), (mask,), prompt, 3, True, min_length=2, max_length=6, alpha=0.6,
                          num_return_sequences=3)
    assert torch.equal(rewards, reward(beam_ids(beams.sequences, beams.lengths, model.config.eos_token_id)))
    # token count = [CLS] + generated tokens (their item.numel(), caption_mplug_scst.py:77)
    assert loss.item() == pytest.approx(authors_scst_objective(beams.scores, beams.lengths + 1, rewards).item(), rel=1e-9)
    assert float(rewards.std()) > 0
    loss.backward()
    for part in (model.text_decoder, model.visual_encoder):
        assert sum(float(p.grad.abs().sum()) for p in part.parameters() if p.grad is not None) > 0


def test_batch_reference_cider_reward_by_hand_and_as_the_authors_repeat_references():
    # Two images, one reference each: every n-gram lies in one image's references -> idf log 2.
    references = [[["dogs", "run"]], [["cats", "sleep"]]]
    candidates = [[["dogs", "run"], ["cats"]], [["cats"], ["dogs", "run"]]]
    rewards = cider_rewards(candidates, references)
    unigram_only = 10 / math.sqrt(2) / 4 * math.exp(-1 / 72)  # "cats" vs "cats sleep": unigram cosine 1/sqrt 2
    assert rewards.flatten().tolist() == pytest.approx([5.0, 0.0, unigram_only, 0.0], rel=1e-12)
    cider_scorer = pytest.importorskip("pycocoevalcap.cider.cider_scorer", reason="pycocoevalcap is not installed")
    theirs = cider_scorer.CiderScorer(n=4, sigma=6.0)  # caption_mplug_scst.py:79-80 caps_gt: references once per beam
    for b, row in enumerate(candidates):
        for candidate in row:
            theirs += (" ".join(candidate), [" ".join(ref) for ref in references[b]])
    assert rewards.flatten().tolist() == pytest.approx(list(theirs.compute_score()[1]), rel=1e-9)


@needs_java
def test_ptb_reward_tokenises_candidates_and_references():
    rewards = ptb_cider_rewards([["Dogs run.", "cats"], ["Cats!", "dogs, run"]], [["dogs run"], ["Cats sleep."]])
    words = cider_rewards([[["dogs", "run"], ["cats"]], [["cats"], ["dogs", "run"]]], [[["dogs", "run"]], [["cats", "sleep"]]])
    assert torch.allclose(rewards, words, rtol=1e-12) and rewards[0, 0] == pytest.approx(5.0)


@pytest.mark.parametrize("size, batch", [("base", 32), ("large", 64)])
def test_shipped_scst_configs_carry_the_authors_values(size, batch):
    cfg = load_config(f"caption_{size}_scst")  # caption_mplug_{size}_scst.yaml: lr1 = lr2 = 1e-6, min_lr 8e-8
    # caption_mplug_scst.py:412 --beam_size default 5, :63 out_size=beam_size: the top-5 beams are the samples
    assert (cfg["scst"], cfg["scst_mode"], cfg["batch_size_train"], cfg["accumulate_steps"]) == (True, "authors", batch, 1)
    assert (cfg["optimizer"]["lr"], cfg["optimizer"]["lr_visual"], cfg["schedule"]["min_lr"]) == (1e-6, 1e-6, 8e-8)
    assert (cfg["num_beams"], cfg["min_length"], cfg["max_length"]) == (5, 8, 25)
    with pytest.raises(ValueError, match="scst_mode"):
        load_config(f"caption_{size}_scst", ["scst_mode=greedy"])
    with pytest.raises(ValueError, match="'scst' is for task 'caption' only"):
        load_config("vqa_base", ["scst=true"])


@pytest.mark.parametrize("mode", ["authors", "sample"])
def test_cli_trains_a_caption_scst_step(tmp_path, monkeypatch, mode):
    import json

    import mplug.run.scst as scst_module
    import mplug.run.train as train_module
    from tiny_dataset import write_tiny_dataset

    calls = []

    def fake_reward(captions, references):  # stands in for PTB + CIDEr-D (java): distinct rewards per beam
        calls.append((captions, references))
        return torch.tensor([[float(k) for k in range(len(row))] for row in captions], dtype=torch.float64)

    monkeypatch.setattr(scst_module.caption_eval, "unavailable_reason", lambda: None)
    monkeypatch.setattr(scst_module, "ptb_cider_rewards", fake_reward)
    config = write_tiny_dataset(tmp_path / "data", "caption", n=2)
    argv = ["--task", "caption", "--config", str(config), "--output", str(tmp_path / "run"), "--set", "scst=true",
            "--set", f"scst_mode={mode}", "--set", "max_steps=1", "--set", "num_beams=2", "--set", "max_length=4",
            "--set", "min_length=1"]
    train_module.main(argv)
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(math.isfinite(loss) for loss in losses)
    if mode == "sample":
        assert calls == []  # our variant rewards word ids with mplug.tasks.cider directly
        return
    records = json.loads((config.parent / "caption_train.json").read_text())
    gold = sorted(sorted(s["raw"].lower() for s in record["sentences"]) for record in records)
    (captions, references), = calls
    assert all(len(row) == 2 and all(isinstance(c, str) for c in row) for row in captions)
    assert all(sorted(refs) in gold for refs in references) and losses[0] != 0.0
