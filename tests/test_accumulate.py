"""Issue 24 item 3, gradient accumulation (mplug.run.accumulate) as the authors' caption_mplug.py:66-79: each of n
micro-batch losses divided by n, one optimiser step per n batches; counted in optimiser steps, resumable bit for bit."""
import subprocess
import sys

import pytest
import torch

from mplug import MPLUG, MPLUGConfig
from mplug.run import train as train_module
from mplug.run.accumulate import accumulate_gradients, group_batches, steps_per_epoch
from mplug.run.run_config import load_config
from test_classification import inputs
from mplug.run.train_state import LAST
from test_train import assert_states_equal, assert_tensors_close, log_lines, stop_after_step_one, subprocess_env, train
from tiny_dataset import write_tiny_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


def test_two_micro_batches_of_b_give_the_gradient_of_one_batch_of_2b():
    # caption_mplug.py:66-68: loss = loss / accum_steps, backward per batch, step at (i + 1) % accum_steps == 0: with
    # mean losses, (grad(mean over b1) + grad(mean over b2)) / 2 = grad(mean over b1 + b2) for |b1| = |b2|.
    torch.manual_seed(0)
    model = MPLUG(MPLUGConfig.tiny(attn_backend="reference")).double().eval()
    model.add_classifier_heads()
    step = train_module.TaskLoss(model, "ve")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    images, ids, mask = inputs(batch=4, seed=5)
    labels = torch.tensor([0, 2, 1, 2])
    whole = dict(images=images, text_ids=ids, text_mask=mask, labels=labels)
    halves = [{name: value[rows] for name, value in whole.items()} for rows in (slice(0, 2), slice(2, 4))]
    loss_one, _ = accumulate_gradients(step, whole, optimizer, torch.device("cpu"))
    grads_one = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    loss_two, _ = accumulate_gradients(step, halves, optimizer, torch.device("cpu"))
    grads_two = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 10
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-12, atol=1e-12)
    for name, grad in grads_two.items():
        torch.testing.assert_close(grad, grads_one[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # and not the sum of the two: one micro-batch alone has half the accumulated gradient's share
    accumulate_gradients(step, halves[:1], optimizer, torch.device("cpu"))
    head = "ve_head.2.weight"
    assert not torch.allclose(dict(model.named_parameters())[head].grad, grads_one[head])


def test_group_batches_and_steps_per_epoch_by_hand():
    # 5 batches, accumulate 2 -> 2 optimiser steps; the 5th batch is left out (an incomplete group)
    batches = [{"inputs": {"x": i}, "dropped": [{"index": i}] if i == 3 else []} for i in range(5)]
    grouped = list(group_batches(iter(batches), 2))
    assert steps_per_epoch(5, 2) == len(grouped) == 2
    assert [group["inputs"] for group in grouped] == [[{"x": 0}, {"x": 1}], [{"x": 2}, {"x": 3}]]
    assert grouped[1]["dropped"] == [{"index": 3}]
    assert list(group_batches(iter(batches), 1)) == batches
    empty = list(group_batches(iter([{"inputs": None, "dropped": []}, {"inputs": {"x": 1}}]), 2))
    assert empty[0]["inputs"] is None  # a micro-batch with no usable item skips the whole step


def test_accumulated_run_counts_optimiser_steps_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """VQA, 4 training records, batch 1, accumulate_steps 2: 2 optimiser steps an epoch, 2 epochs; stopped right
    after the step-1 checkpoint (mid-epoch, 2 batches in) and resumed, it ends as the uninterrupted run bit for bit."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    overrides = ["epochs=2", "batch_size_train=1", "save_every=1", "accumulate_steps=2", "max_grad_norm=0.0"]
    expected = train(config, tmp_path / "straight", "vqa", *overrides)
    assert expected["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}
    assert expected["scheduler"]["last_epoch"] == 4 and all(int(s["step"]) == 4 for s in expected["optimizer"]["state"].values())
    assert [line["step"] for line in log_lines(tmp_path / "straight")] == [1, 2, 3, 4]
    stop_after_step_one(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "stopped", "vqa", *overrides)
    monkeypatch.undo()
    resumed = train(config, tmp_path / "stopped", "vqa", *overrides, resume=True)
    assert resumed["progress"] == expected["progress"]
    assert_states_equal(resumed["model"], expected["model"])
    assert_states_equal(resumed["optimizer"], expected["optimizer"])
    assert_states_equal(resumed["scheduler"], expected["scheduler"])
    assert log_lines(tmp_path / "stopped")[-1]["loss"] == log_lines(tmp_path / "straight")[-1]["loss"]


def test_accumulate_steps_checked_and_caption_configs_carry_the_authors_4():
    # caption_mplug.py:337 --accum_steps default 4; caption_mplug.py train() clips no gradient
    for name in ("caption_base", "caption_large"):
        cfg = load_config(name)
        assert (cfg["accumulate_steps"], cfg["max_grad_norm"]) == (4, 0.0)
    assert load_config("vqa_base")["accumulate_steps"] == 1  # vqa_mplug.py:320 --accum_steps 1
    with pytest.raises(ValueError, match="'accumulate_steps' must be an int >= 1"):
        load_config("caption_base", ["accumulate_steps=0"])
    with pytest.raises(ValueError, match="schedule.kind 'authors' steps by batches"):
        load_config("caption_base", ["schedule.kind=authors"])


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_accumulating_equal_one_process_on_the_combined_batch(tmp_path, sharding):
    """torchrun, 2 CPU processes (DDP: static graph, reduced every micro-batch; FSDP2: the first micro-batch without
    gradient reduction) x batch 1 x accumulate_steps 2 vs one process
    x batch 4, 2 steps of VQA: each rank's 2 micro-batches are the samples its batch of 2 would hold, so the losses and
    AdamW moments match (float tolerance, as tests/test_train.py's DDP test)."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mplug.run.train",
               *sharding, "--task", "vqa", "--config", str(config), "--set", "epochs=2", "--set", "batch_size_train=1",
               "--set", "accumulate_steps=2", "--output", str(tmp_path / "ddp")]
    finished = subprocess.run(command, env={**subprocess_env(), "OMP_NUM_THREADS": "1"}, cwd=tmp_path, capture_output=True,
                              text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]
    distributed = torch.load(tmp_path / "ddp" / LAST, weights_only=True)
    single = train(config, tmp_path / "one", "vqa", "epochs=2", "batch_size_train=4")
    assert distributed["progress"] == single["progress"] == {"epoch": 2, "step": 2, "step_in_epoch": 0}
    for line, expected in zip(log_lines(tmp_path / "ddp"), log_lines(tmp_path / "one")):
        assert line["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for moment in ("exp_avg", "exp_avg_sq"):
        moments, expected = ({name: state[moment] for name, state in run["optimizer"]["state"].items()} for run in (distributed, single))
        largest = max(value.abs().max().item() for value in expected.values())
        assert_tensors_close(moments, expected, 1e-5 * largest, moment)
