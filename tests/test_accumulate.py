"""Issue 24 item 3, gradient accumulation (mplug.run.accumulate) as the authors' caption_mplug.py:66-79: each of n
micro-batch losses divided by n, one optimiser step per n batches, an epoch's last len(loader) % n batches carried into
the next epoch's first step; counted in optimiser steps, resumable bit for bit (inside an epoch and at its end)."""
import pytest
import torch
from torch import nn

from mplug import MPLUG, MPLUGConfig
from mplug.run import train as train_module
from mplug.run.accumulate import accumulate_gradients, carried_batches, group_batches, steps_per_epoch
from mplug.run.run_config import load_config
from test_classification import inputs
from distributed import train_two_processes
from test_train import assert_states_equal, assert_tensors_close, log_lines, stop_after_step, train
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
    loss_two, _ = accumulate_gradients(step, halves, optimizer, torch.device("cpu"), 2)
    grads_two = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 10
    torch.testing.assert_close(loss_two, loss_one, rtol=1e-12, atol=1e-12)
    for name, grad in grads_two.items():
        torch.testing.assert_close(grad, grads_one[name], rtol=1e-9, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # and not the sum of the two: one micro-batch alone has half the accumulated gradient's share
    accumulate_gradients(step, halves[:1], optimizer, torch.device("cpu"), 2)
    head = "ve_head.2.weight"
    assert not torch.allclose(dict(model.named_parameters())[head].grad, grads_one[head])


def test_group_batches_and_steps_per_epoch_by_hand():
    # 5 batches, accumulate 2 -> 2 optimiser steps; the 5th batch is never drawn, or opens the next epoch's first step
    batches = [{"inputs": {"x": i}, "dropped": [{"index": i}] if i == 3 else []} for i in range(5)]
    drawn = []

    def loader():
        for batch in batches:
            drawn.append(batch["inputs"]["x"])
            yield batch

    grouped = list(group_batches(loader(), 2, steps_per_epoch(5, 2)))
    assert steps_per_epoch(5, 2) == len(grouped) == 2 and drawn == [0, 1, 2, 3]
    assert [group["inputs"] for group in grouped] == [[{"x": 0}, {"x": 1}], [{"x": 2}, {"x": 3}]]
    assert grouped[1]["dropped"] == [{"index": 3}]
    carried = list(group_batches(iter(batches), 2, 2, batches[4:]))
    assert [[part["x"] for part in group["inputs"]] for group in carried] == [[4, 0, 1], [2, 3]]
    assert (carried_batches(5, 2, "carry"), carried_batches(5, 2, "drop"), carried_batches(4, 2, "carry")) == (1, 0, 0)
    assert list(group_batches(iter(batches), 1, 5)) == batches
    assert list(group_batches(iter(batches), 1, 3)) == batches[:3]
    empty = list(group_batches(iter([{"inputs": None, "dropped": []}, {"inputs": {"x": 1}}]), 2, 1))
    assert empty[0]["inputs"] is None  # a micro-batch with no usable item skips the whole step


class Scalar(nn.Module):
    """One weight w (0 at first), loss (w - target)^2 / 2: its gradient w - target can be followed by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, target):
        return (self.w - target) ** 2 / 2


def authors_caption_loop(targets, epochs: int, accum_steps: int, lr: float) -> list:
    """caption_mplug.py:47 and :66-79 transcribed: enumerate restarts each epoch, loss / accum_steps, backward, step and
    zero_grad at (i + 1) % accum_steps == 0, no zero_grad at an epoch's start -> w after each optimiser step."""
    model = Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    weights = []
    for _ in range(epochs):
        for i, target in enumerate(targets):
            (model(target) / accum_steps).backward()
            if (i + 1) % accum_steps == 0:
                optimizer.step()
                optimizer.zero_grad()
                weights.append(model.w.item())
    return weights


def our_loop(targets, epochs: int, accum_steps: int, lr: float, last_group: str) -> list:
    """mplug.run.train's use of mplug.run.accumulate on the same batches -> w after each optimiser step."""
    model = Scalar()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batches = [{"inputs": {"target": target}} for target in targets]
    carried = carried_batches(len(batches), accum_steps, last_group)
    weights = []
    for epoch in range(epochs):
        tail = batches[len(batches) - carried:] if epoch and carried else []
        for group in group_batches(iter(batches), accum_steps, steps_per_epoch(len(batches), accum_steps), tail):
            accumulate_gradients(model, group["inputs"], optimizer, torch.device("cpu"), accum_steps)
            optimizer.step()
            weights.append(model.w.item())
    return weights


def test_five_batches_accumulating_two_over_two_epochs_step_as_the_authors_by_hand():
    # targets 1..5, SGD lr 0.5, w0 = 0, accum 2 (caption_mplug.py:66-79); a step's gradient is sum(w - target) / 2:
    # epoch 0: (0-1 + 0-2)/2 = -1.5 -> w 0.75; (0.75-3 + 0.75-4)/2 = -2.75 -> w 2.125; batch 5 left: (2.125-5)/2.
    # epoch 1 (carry, no zero_grad at :47): -1.4375 + (2.125-1 + 2.125-2)/2 = -0.8125 -> w 2.53125;
    #   (2.53125-3 + 2.53125-4)/2 = -0.96875 -> w 3.015625; epoch 1's batch 5 gradient is never stepped.
    # drop (ours before): epoch 1: 0.625 -> w 1.8125; -1.6875 -> w 2.65625.
    targets = [torch.tensor(float(t), dtype=torch.float64) for t in range(1, 6)]
    carry = [0.75, 2.125, 2.53125, 3.015625]
    assert authors_caption_loop(targets, 2, 2, 0.5) == carry
    assert our_loop(targets, 2, 2, 0.5, "carry") == carry
    assert our_loop(targets, 2, 2, 0.5, "drop") == [0.75, 2.125, 1.8125, 2.65625]


def count_micro_batches(monkeypatch) -> list:
    """Make mplug.run.train record (micro-batches, accumulate_steps) of each optimiser step in the returned list."""
    counts = []
    real = train_module.accumulate_gradients

    def counting(step_module, inputs, optimizer, device, accumulate_steps):
        counts.append((len(inputs), accumulate_steps))
        return real(step_module, inputs, optimizer, device, accumulate_steps)

    monkeypatch.setattr(train_module, "accumulate_gradients", counting)
    return counts


def test_carried_batch_opens_the_next_epoch_and_a_run_resumed_at_the_epoch_end_stays_exact(tmp_path, monkeypatch):
    """Retrieval (random ITM negatives: the RNG matters), 20 records = 5 batches of 4, accumulate_steps 2, 2 epochs:
    steps of 2, 2, 3 (epoch 0's 5th batch first), 2 micro-batches as caption_mplug.py:66-79; "drop" steps 2 each
    and ends elsewhere; stopped right after the epoch-0-end checkpoint (step 2) and resumed, it ends as the
    uninterrupted run bit for bit."""
    config = write_tiny_dataset(tmp_path / "data", "retrieval", n=20)
    overrides = ["epochs=2", "batch_size_train=4", "save_every=1", "accumulate_steps=2"]
    counts = count_micro_batches(monkeypatch)
    expected = train(config, tmp_path / "straight", "retrieval", *overrides)
    assert counts == [(2, 2), (2, 2), (3, 2), (2, 2)]
    dropped = train(config, tmp_path / "drop", "retrieval", *overrides, "accumulate_last_group=drop")
    assert counts[4:] == [(2, 2)] * 4 and dropped["progress"] == expected["progress"]
    assert not torch.equal(dropped["model"]["text_proj.weight"], expected["model"]["text_proj.weight"])
    monkeypatch.undo()
    stop_after_step(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "stopped", "retrieval", *overrides)
    monkeypatch.undo()
    assert torch.load(tmp_path / "stopped" / "checkpoint_last.pth", weights_only=True)["progress"] == {
        "epoch": 1, "step": 2, "step_in_epoch": 0}
    resumed = train(config, tmp_path / "stopped", "retrieval", *overrides, resume=True)
    assert resumed["progress"] == expected["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}
    for part in ("model", "optimizer", "scheduler"):
        assert_states_equal(resumed[part], expected[part], part)
    assert [line["loss"] for line in log_lines(tmp_path / "stopped")] == [line["loss"] for line in log_lines(tmp_path / "straight")]


def test_accumulated_run_counts_optimiser_steps_and_resumes_bit_exactly(tmp_path, monkeypatch):
    """VQA, 4 training records, batch 1, accumulate_steps 2: 2 optimiser steps an epoch, 2 epochs; stopped right
    after the step-1 checkpoint (mid-epoch, 2 batches in) and resumed, it ends as the uninterrupted run bit for bit."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    overrides = ["epochs=2", "batch_size_train=1", "save_every=1", "accumulate_steps=2", "max_grad_norm=0.0"]
    expected = train(config, tmp_path / "straight", "vqa", *overrides)
    assert expected["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}
    assert expected["scheduler"]["last_epoch"] == 4 and all(int(s["step"]) == 4 for s in expected["optimizer"]["state"].values())
    assert [line["step"] for line in log_lines(tmp_path / "straight")] == [1, 2, 3, 4]
    stop_after_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "stopped", "vqa", *overrides)
    monkeypatch.undo()
    resumed = train(config, tmp_path / "stopped", "vqa", *overrides, resume=True)
    assert resumed["progress"] == expected["progress"]
    assert_states_equal(resumed["model"], expected["model"])
    assert_states_equal(resumed["optimizer"], expected["optimizer"])
    assert_states_equal(resumed["scheduler"], expected["scheduler"])
    assert log_lines(tmp_path / "stopped")[-1]["loss"] == log_lines(tmp_path / "straight")[-1]["loss"]


def test_a_checkpoint_from_before_the_carry_resumes_only_as_it_ran(tmp_path, monkeypatch):
    """A checkpoint whose config has no accumulate_last_group ran "drop": resuming it with the default "carry" is
    refused naming both; with accumulate_last_group=drop it goes on."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    overrides = ["epochs=2", "batch_size_train=1", "save_every=1", "accumulate_steps=2"]
    stop_after_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(config, tmp_path / "old", "vqa", *overrides)
    monkeypatch.undo()
    path = tmp_path / "old" / "checkpoint_last.pth"
    state = torch.load(path, weights_only=True)
    del state["config"]["accumulate_last_group"]
    torch.save(state, path)
    with pytest.raises(ValueError, match="accumulate_last_group: checkpoint 'drop', now 'carry'"):
        train(config, tmp_path / "old", "vqa", *overrides, resume=True)
    resumed = train(config, tmp_path / "old", "vqa", *overrides, "accumulate_last_group=drop", resume=True)
    assert resumed["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}


def test_accumulate_steps_checked_and_caption_configs_carry_the_authors_4():
    # caption_mplug.py:337 --accum_steps default 4; its train() (:31-97) clips no gradient; :47,77-79 carry
    for name in ("caption_base", "caption_large"):
        cfg = load_config(name)
        assert (cfg["accumulate_steps"], cfg["max_grad_norm"], cfg["accumulate_last_group"]) == (4, 0.0, "carry")
    with pytest.raises(ValueError, match="'accumulate_last_group' must be one of \\('carry', 'drop'\\)"):
        load_config("caption_base", ["accumulate_last_group=keep"])
    assert load_config("vqa_base")["accumulate_steps"] == 1  # vqa_mplug.py:320 --accum_steps 1
    with pytest.raises(ValueError, match="'accumulate_steps' must be an int >= 1"):
        load_config("caption_base", ["accumulate_steps=0"])
    with pytest.raises(ValueError, match="schedule.kind 'authors' steps by batches"):
        load_config("caption_base", ["schedule.kind=authors"])


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_accumulating_equal_one_process_on_the_combined_batch(tmp_path, sharding):
    """torchrun, 2 CPU processes (DDP: static graph, reduced every micro-batch; FSDP2: the first micro-batches without
    gradient reduction) x batch 1 vs one process x batch 2, both accumulate_steps 2, 2 epochs of VQA on 6 records:
    3 batches an epoch, so epoch 1's first step carries epoch 0's 3rd batch. Each rank's micro-batch j holds one of
    the one-process batch j's 2 samples, so the losses and AdamW moments match (float tolerance, as
    tests/test_train.py's DDP test)."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=3)
    distributed = train_two_processes(tmp_path / "ddp", *sharding, "--task", "vqa", "--config", str(config), "--set",
                                      "epochs=2", "--set", "batch_size_train=1", "--set", "accumulate_steps=2")
    single = train(config, tmp_path / "one", "vqa", "epochs=2", "batch_size_train=2", "accumulate_steps=2")
    assert distributed["progress"] == single["progress"] == {"epoch": 2, "step": 2, "step_in_epoch": 0}
    for line, expected in zip(log_lines(tmp_path / "ddp"), log_lines(tmp_path / "one")):
        assert line["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    for moment in ("exp_avg", "exp_avg_sq"):
        moments, expected = ({name: state[moment] for name, state in run["optimizer"]["state"].items()} for run in (distributed, single))
        largest = max(value.abs().max().item() for value in expected.values())
        assert_tensors_close(moments, expected, 1e-5 * largest, moment)
