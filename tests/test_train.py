"""mplug.run.runtime and mplug.run.train on the CPU: weights loading, one process, 2-process gloo DDP and FSDP2, kill and
resume (then evaluate), atomic checkpoints, parameter groups, the schedule, clear errors. The training tests run on
tests/tiny_dataset.py's data with the tiny model at image size 32."""
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mplug.run.evaluate as evaluate_module
import mplug.run.train as train_module
from mplug import MPLUG, MPLUGConfig
from mplug.run.run_config import load_config
from mplug.run.runtime import (
    CHECKPOINT_FORMAT, all_gather_objects, autocast, build_model, init_distributed, is_main, load_weights,
)
from mplug.run.train_state import LAST, Progress, atomic_save, read_checkpoint, save_checkpoint
from distributed import subprocess_env, train_two_processes
from test_checkpoint import authors_layout, random_state
from tiny_dataset import write_tiny_dataset


def test_one_process_runtime_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = init_distributed()
    assert (info.rank, info.world_size, info.local_rank, info.device.type) == (0, 1, 0, "cpu")
    assert is_main()
    assert all_gather_objects([{"id": 1}, {"id": 2}]) == [{"id": 1}, {"id": 2}]
    with autocast(info.device):
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32


def test_load_weights_reads_training_checkpoints_and_the_authors_files(tmp_path):
    config = MPLUGConfig.tiny()
    torch.manual_seed(1)
    trained = MPLUG(config)
    own = tmp_path / "own.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": trained.state_dict(), "config": {"task": "vqa", "model": "tiny"}}, own)
    torch.manual_seed(2)
    model = MPLUG(config)
    assert load_weights(model, own, "vqa") == ([], [], [])
    for (name, value), expected in zip(model.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(value, expected), name

    shapes, _ = authors_layout(config, "pretrained", momentum=False)
    state = random_state(shapes, seed=3)
    authors = tmp_path / "authors.pth"
    torch.save({"model": state}, authors)
    result = load_weights(model, authors, "pretrain")
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert torch.equal(model.itm_head.weight, state["itm_head.weight"])


def test_load_weights_names_a_checkpoint_of_another_model(tmp_path):
    other = MPLUG(MPLUGConfig.tiny(decoder_layers=1))
    path = tmp_path / "other.pth"
    torch.save({"format": CHECKPOINT_FORMAT, "model": other.state_dict(), "config": {"task": "caption", "model": "tiny"}}, path)
    with pytest.raises(ValueError, match=r"other\.pth.*does not fit this model.*missing keys.*text_decoder"):
        load_weights(MPLUG(MPLUGConfig.tiny()), path, "caption")


pytestmark = pytest.mark.usefixtures("one_thread")


def stop_after_step(monkeypatch, step: int = 1):
    """Make mplug.run.train raise KeyboardInterrupt right after it saved ``step`` (a run killed after that save)."""
    save = train_module.save_checkpoint

    def save_then_stop(output, model, optimizer, scheduler, progress, cfg, steps=()):
        save(output, model, optimizer, scheduler, progress, cfg, steps)
        if progress.step == step:
            raise KeyboardInterrupt(f"stopped after step {step}")

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)


def train(config, output, task="vqa", *overrides, resume=False):
    """Run mplug.run.train in this process -> the last checkpoint (loaded)."""
    argv = ["--task", task, "--config", str(config), "--output", str(output)]
    argv += [item for override in overrides for item in ("--set", override)]
    argv += ["--resume", str(output)] if resume else []
    return torch.load(train_module.main(argv), weights_only=True)


def log_lines(output):
    return [json.loads(line) for line in (Path(output) / "log.jsonl").read_text().splitlines()]


def assert_states_equal(state, expected, what="state"):
    """Nested dicts/sequences of tensors and values equal bit for bit (a tuple equals the list torch.load may give)."""
    if isinstance(state, dict):
        assert state.keys() == expected.keys(), what
        for key, value in state.items():
            assert_states_equal(value, expected[key], f"{what}.{key}")
    elif isinstance(state, (list, tuple)):
        assert isinstance(expected, (list, tuple)) and len(state) == len(expected), what
        for index, (value, other) in enumerate(zip(state, expected)):
            assert_states_equal(value, other, f"{what}[{index}]")
    elif torch.is_tensor(state):
        assert torch.equal(state, expected), what
    else:
        assert state == expected, what


def assert_tensors_close(tensors, expected, atol, what):
    """Two {name: tensor} dicts with the same names, equal within ``atol``."""
    assert tensors.keys() == expected.keys(), what
    for name, tensor in tensors.items():
        torch.testing.assert_close(tensor, expected[name], atol=atol, rtol=1e-4, msg=lambda m: f"{what} {name}: {m}")


def test_one_process_training_lowers_the_loss_and_logs(tmp_path):
    """VQA on 2 questions = one batch, seen 6 times (one step an epoch, each with its own augmentation): the loss falls
    to well below half; log.jsonl has a line per step, the cosine schedule ends at min_lr."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=1)
    state = train(config, tmp_path / "run", "vqa", "epochs=6")
    lines = log_lines(tmp_path / "run")
    assert [line["step"] for line in lines] == list(range(1, 7))
    assert all(line["samples_per_s"] > 0 and line["peak_rss_bytes"] > 10**7 for line in lines)
    assert lines[-1]["lr"] == [pytest.approx(1e-5)] and lines[0]["lr"][0] > lines[1]["lr"][0] > lines[-1]["lr"][0]
    assert lines[-1]["loss"] < 0.5 * lines[0]["loss"], [line["loss"] for line in lines]
    assert state["progress"] == {"epoch": 6, "step": 6, "step_in_epoch": 0}
    assert state["config"]["epochs"] == 6 and state["config"]["task"] == "vqa"


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_two_gloo_processes_equal_one_process_on_the_combined_batch(tmp_path, sharding):
    """torchrun, 2 CPU processes x batch 2 (DDP, or FSDP2 with --fsdp) vs one process x batch 4, 2 steps (epochs) of
    VQA: the same losses, weights and AdamW moments (float tolerance: the gradient sum runs in another order). The
    moments carry the gradients' scale, which AdamW's update itself would hide."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    distributed = train_two_processes(tmp_path / "ddp", "--task", "vqa", "--config", str(config), "--set", "epochs=2",
                                      *sharding, "--set", "batch_size_train=2")
    single = train(config, tmp_path / "one", "vqa", "epochs=2", "batch_size_train=4")
    assert distributed["progress"] == single["progress"] == {"epoch": 2, "step": 2, "step_in_epoch": 0}
    for line, expected in zip(log_lines(tmp_path / "ddp"), log_lines(tmp_path / "one")):
        assert line["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert len(distributed["rng"]) == 2
    for moment in ("exp_avg", "exp_avg_sq"):
        moments, expected = ({name: state[moment] for name, state in run["optimizer"]["state"].items()} for run in (distributed, single))
        largest = max(value.abs().max().item() for value in expected.values())
        assert_tensors_close(moments, expected, 1e-5 * largest, moment)
    # AdamW moves an element by about lr whatever its gradient's size, so where the gradient is rounding noise (the
    # key biases' exact gradient is 0) the weights may differ by up to 2 lr a step; the moments above hold the rest.
    assert_tensors_close(distributed["model"], single["model"], 2 * 2 * 1e-3, "weight")


KILL_AFTER_SAVE = """
import os, signal, sys
import mplug.run.train as train
save = train.save_checkpoint
def save_then_die(output, model, optimizer, scheduler, progress, cfg, steps=()):
    save(output, model, optimizer, scheduler, progress, cfg, steps)
    if progress.step == int(os.environ["KILL_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
train.main(sys.argv[1:])
"""


def test_train_kill_resume_evaluate_equals_the_uninterrupted_run_bit_exactly(tmp_path):
    """The tiny end-to-end run. Retrieval (random ITM negatives, momentum copies and feature queues), 2 steps an
    epoch, 2 epochs: a process SIGKILLed right after its step-1 checkpoint (inside epoch 0), resumed with --resume,
    ends with the uninterrupted run's weights, optimiser state and queues bit for bit; python -m mplug.run.evaluate then
    scores the resumed checkpoint (recall@1/5/10 both ways over the 8 test images and their 16 captions)."""
    config = write_tiny_dataset(tmp_path / "data", "retrieval", n=8)  # 4 images x 2 captions
    overrides = ["epochs=2", "save_every=1", "batch_size_train=4"]  # a batch holds >= 2 images: ITM has negatives
    expected = train(config, tmp_path / "straight", "retrieval", *overrides)
    output = tmp_path / "killed"
    command = [sys.executable, "-c", KILL_AFTER_SAVE, "--task", "retrieval", "--config", str(config), "--output", str(output)]
    command += [item for override in overrides for item in ("--set", override)]
    killed = subprocess.run(command, env={**subprocess_env(), "KILL_AT_STEP": "1"}, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert read_checkpoint(output)["progress"] == {"epoch": 0, "step": 1, "step_in_epoch": 1}
    with open(output / "log.jsonl", "a") as log:  # as if the killed run had logged step 2 before it died
        log.write(json.dumps({"step": 2, "epoch": 0, "loss": -1.0}) + "\n")
    resumed = train(config, output, "retrieval", *overrides, resume=True)
    assert resumed["progress"] == expected["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}
    assert_states_equal(resumed["model"], expected["model"])
    assert_states_equal(resumed["optimizer"], expected["optimizer"])
    assert [line["loss"] for line in log_lines(output)] == [line["loss"] for line in log_lines(tmp_path / "straight")]
    scores = evaluate_module.main(["--task", "retrieval", "--config", str(config), "--checkpoint", str(output / LAST),
                                   "--output", str(tmp_path / "eval")])
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == scores and (scores["images"], scores["texts"]) == (8, 16)
    assert all(0 <= scores[f"{way}_r{k}"] <= 100 for way in ("i2t", "t2i") for k in (1, 5, 10))


def test_a_crash_while_saving_leaves_the_last_checkpoint_whole(tmp_path, monkeypatch):
    model = MPLUG(MPLUGConfig.tiny())
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    save_checkpoint(tmp_path, model, optimizer, scheduler, Progress(0, 5, 5), {"task": "caption"})
    real_save = torch.save

    def full_disk(obj, stream):
        real_save(obj, stream)
        stream.truncate(stream.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path, model, optimizer, scheduler, Progress(0, 6, 6), {"task": "caption"}, steps=(6,))
    monkeypatch.undo()
    assert sorted(path.name for path in tmp_path.iterdir()) == [LAST]
    assert read_checkpoint(tmp_path)["progress"] == {"epoch": 0, "step": 5, "step_in_epoch": 5}


def test_atomic_save_replaces_the_whole_file(tmp_path):
    atomic_save({"a": torch.arange(3)}, tmp_path / "x.pth")
    atomic_save({"b": torch.ones(2)}, tmp_path / "x.pth")
    assert list(torch.load(tmp_path / "x.pth", weights_only=True)) == ["b"]
    assert [path.name for path in tmp_path.iterdir()] == ["x.pth"]


@pytest.mark.parametrize("overrides, message", [
    (["--set", "learning_rate=1"], r"unknown config key 'learning_rate'"),
    (["--set", "train_file=nowhere.json"], r"nowhere\.json"),
    (["--task", "caption"], r"--task caption but config .* is for task 'vqa'"),
    (["--resume", "{tmp}/empty"], r"--resume .*empty.*no checkpoint_last\.pth"),
    (["--task", "retrieval", "--config", "retrieval_base", "--fsdp"], r"--fsdp does not support --task retrieval.*use DDP"),
])
def test_bad_config_and_missing_data_are_named(tmp_path, overrides, message):
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=2)
    (tmp_path / "empty").mkdir()
    argv = ["--task", "vqa", "--config", str(config), "--output", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=message):
        train_module.main(argv + [item.format(tmp=tmp_path) for item in overrides])
    assert not (tmp_path / "run" / LAST).exists()


def test_resume_refuses_a_changed_learning_rate(tmp_path):
    config = write_tiny_dataset(tmp_path / "data", "caption", n=2)
    train(config, tmp_path / "run", "caption", "max_steps=1")
    with pytest.raises(ValueError, match=r"optimizer: checkpoint .*'lr': 0\.001.*now .*'lr': 0\.002"):
        train(config, tmp_path / "run", "caption", "max_steps=1", "optimizer.lr=2e-3", resume=True)


def test_parameter_groups_follow_the_config_and_frozen_parts_stay_out():
    model = MPLUG(MPLUGConfig.tiny())
    train_module.freeze_unused(model, "caption")
    groups = train_module.parameter_groups(model, {"lr": 1e-4, "lr_visual": 1e-5, "lr_head": None, "weight_decay": 0.02})
    names = {id(p): name for name, p in model.named_parameters()}
    placed = {names[id(p)]: (group["lr"], group["weight_decay"]) for group in groups for p in group["params"]}
    trained = {name for name, p in model.named_parameters() if name.split(".")[0] in ("visual_encoder", "text_decoder")}
    assert set(placed) == trained
    for name, (lr, decay) in placed.items():
        # the authors' optim_factory.py:141-167: visn_fc / visn_layer_norm at lr1, no decay by name
        visual = name.startswith("visual_encoder.visual.")
        assert lr == (1e-5 if visual else 1e-4), name
        assert decay == (0.0 if "bias" in name or "LayerNorm.weight" in name else 0.02), name


@pytest.mark.parametrize("task, head", [("ve", "ve_head"), ("nlvr", "nlvr_head"), ("grounding", None)])
def test_classification_and_grounding_train_a_step_and_save(tmp_path, task, head):
    """One optimiser step of ve / nlvr / grounding on the tiny data writes a checkpoint; the classifier head of the
    task is in the lr_head group and moved, the other task's head stays frozen and unchanged."""
    config = write_tiny_dataset(tmp_path / "data", task, n=2)
    torch.manual_seed(0)
    initial = build_model(load_config(str(config)), torch.device("cpu"), task).state_dict()
    state = train(config, tmp_path / "run", task, "max_steps=1", "optimizer.lr_head=0.01")
    assert state["progress"]["step"] == 1 and state["config"]["task"] == task
    assert math.isfinite(log_lines(tmp_path / "run")[0]["loss"])
    changed = {name for name, tensor in state["model"].items() if not torch.equal(tensor, initial[name])}
    assert any(name.startswith("fusion_encoder.") for name in changed)
    if head is not None:
        other = "nlvr_head" if head == "ve_head" else "ve_head"
        assert f"{head}.0.weight" in changed and not any(name.startswith(other) for name in changed)
        assert 0.01 in [group["initial_lr"] for group in state["optimizer"]["param_groups"]]
    else:
        assert "ve_head.0.weight" not in state["model"] and any(name.startswith("text_decoder.") for name in changed)


def test_warmup_then_cosine_to_min_lr():
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    schedule = train_module.build_schedule(optimizer, {"warmup_steps": 2, "warmup_ratio": None, "min_lr": 0.1}, 6)
    lrs = []
    for _ in range(7):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert lrs == pytest.approx([0.5, 1.0] + cosine)
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1)


def test_checkpoint_weights_and_bad_records_skipped_and_counted(tmp_path, capsys):
    """--checkpoint loads the weights (lr 0: one step leaves them as loaded); a malformed record stops the run naming
    its file and index, or with --skip-bad-records is dropped and counted."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=1)
    records = json.loads((tmp_path / "data" / "vqa_train.json").read_text())
    (tmp_path / "data" / "vqa_train.json").write_text(json.dumps(records + [{"image": "img_0.png", "answer": "red"}]))
    torch.manual_seed(5)
    source = MPLUG(MPLUGConfig.tiny()).state_dict()
    torch.save({"format": CHECKPOINT_FORMAT, "model": source, "config": {"task": "vqa", "model": "tiny"}}, tmp_path / "own.pth")
    argv = ["--task", "vqa", "--config", str(config), "--output", str(tmp_path / "run"), "--checkpoint", str(tmp_path / "own.pth"),
            "--set", "optimizer.lr=0", "--set", "optimizer.lr_visual=0", "--set", "schedule.min_lr=0"]
    with pytest.raises(ValueError, match=r"vqa_train\.json: record 2"):
        train_module.main(argv)
    state = torch.load(train_module.main(argv + ["--skip-bad-records"]), weights_only=True)
    assert "skipped 1 bad records" in capsys.readouterr().err
    assert state["progress"]["step"] == 1
    assert_states_equal(state["model"], source)


def test_undecodable_image_is_named_or_skipped_and_resume_stays_bit_exact(tmp_path, monkeypatch, capsys):
    """Issue 23 item 7: a truncated PNG stops the run naming its file and record; with --skip-bad-records its batch
    (batch 1: the record alone) takes no optimiser step and logs no line while the step counter and the data order go
    on, the end reports 1 skipped record, and a run stopped after step 1 and resumed ends bit for bit as the
    uninterrupted one."""
    config = write_tiny_dataset(tmp_path / "data", "vqa", n=1)  # train: record 0 coco/img_0.png, record 1 vg/img_0.png
    image = tmp_path / "data" / "coco" / "img_0.png"
    image.write_bytes(image.read_bytes()[: image.stat().st_size // 2])
    overrides = ["epochs=2", "batch_size_train=1", "save_every=1"]
    with pytest.raises(ValueError, match=r"vqa_train\.json: record 0: cannot read image .*coco/img_0\.png"):
        train(config, tmp_path / "strict", "vqa", *overrides)
    argv = ["--task", "vqa", "--config", str(config), "--skip-bad-records"]
    argv += [item for override in overrides + ["num_workers=1"] for item in ("--set", override)]
    expected = torch.load(train_module.main(argv + ["--output", str(tmp_path / "straight")]), weights_only=True)
    assert "skipped 1 bad records whose image could not be used" in capsys.readouterr().err
    assert expected["progress"] == {"epoch": 2, "step": 4, "step_in_epoch": 0}
    assert len(log_lines(tmp_path / "straight")) == 2, "one logged step per epoch: the other batch held only the bad record"

    stop_after_step(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_module.main(argv + ["--output", str(tmp_path / "stopped")])
    monkeypatch.undo()
    resumed = torch.load(train_module.main(argv + ["--output", str(tmp_path / "stopped"), "--resume", str(tmp_path / "stopped")]),
                         weights_only=True)
    assert resumed["progress"] == expected["progress"]
    assert_states_equal(resumed["model"], expected["model"])
    assert_states_equal(resumed["optimizer"], expected["optimizer"])
    assert_states_equal(resumed["scheduler"], expected["scheduler"])
    logged = [[(line["step"], line["loss"], line["lr"]) for line in log_lines(tmp_path / run)] for run in ("stopped", "straight")]
    assert logged[0] == logged[1]
