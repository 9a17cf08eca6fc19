"""Issue 23: runs that never lose work or silently go wrong. mplug.run.train / mplug.run.evaluate on the tiny VQA data
(tests/tiny_dataset.py): checkpoints that load nothing, output folders (lock, overwrite, resume, stale temporaries),
divergence, checkpoints moving between tasks, atomic and checked loads, log.jsonl, resume changes, file modes."""
import json
import os
import stat

import pytest
import torch

import mplug.run.evaluate as evaluate_module
import mplug.run.train as train_module
from mplug import MPLUG, MPLUGConfig, load_official_checkpoint
from mplug.run.data.records import load_json_list
from mplug.run.output import OutputLock, open_run_output, read_log
from mplug.run.run_config import load_config
from mplug.run.runtime import CHECKPOINT_FORMAT, atomic_write, build_model, load_weights
from mplug.run.train_state import LAST, check_same_world_size
from test_checkpoint import authors_layout, random_state
from tiny_dataset import write_tiny_dataset


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def vqa(tmp_path):
    """The tiny VQA config (one image: 2 training questions, one batch)."""
    return write_tiny_dataset(tmp_path / "data", "vqa", n=1)


def train_argv(config, output, *extra, overrides=("max_steps=1",)):
    return ["--task", "vqa", "--config", str(config), "--output", str(output), *extra,
            *[item for override in overrides for item in ("--set", override)]]


def evaluate_argv(config, checkpoint, output, *extra):
    return ["--task", "vqa", "--config", str(config), "--checkpoint", str(checkpoint), "--output", str(output), *extra]


def own_checkpoint(path, task, seed=0, **changes):
    """An mplug.run.train checkpoint of the tiny model of ``task`` (seeded weights), tensors replaced by ``changes``."""
    cfg = load_config("vqa_base", ["model=tiny", "image_size=32"])
    torch.manual_seed(seed)
    state = build_model(cfg, "cpu", task).state_dict()
    state.update(changes)
    torch.save({"format": CHECKPOINT_FORMAT, "model": state, "config": {"task": task, "model": "tiny"}}, path)
    return state


def tiny(task):
    return build_model(load_config("vqa_base", ["model=tiny", "image_size=32"]), "cpu", task)


# item 2
def test_a_checkpoint_that_loads_nothing_is_refused_unless_partial_load(tmp_path, vqa, capsys):
    empty = tmp_path / "e.pth"
    torch.save({}, empty)
    with pytest.raises(ValueError, match=r"e\.pth.*missing keys.*--partial-load"):
        evaluate_module.main(evaluate_argv(vqa, empty, tmp_path / "eval"))
    assert not (tmp_path / "eval" / "metrics.json").exists()
    with pytest.raises(ValueError, match=r"e\.pth.*missing keys.*--partial-load"):
        train_module.main(train_argv(vqa, tmp_path / "run", "--checkpoint", str(empty)))
    assert not (tmp_path / "run" / LAST).exists()
    train_module.main(train_argv(vqa, tmp_path / "run", "--checkpoint", str(empty), "--partial-load"))
    assert (tmp_path / "run" / LAST).is_file()


# item 3
def test_a_new_run_into_an_earlier_run_is_refused_unless_resume_or_overwrite(tmp_path, vqa, capsys):
    output = tmp_path / "run"
    train_module.main(train_argv(vqa, output))
    first = torch.load(output / LAST, weights_only=True)["model"]
    with pytest.raises(ValueError, match=r"already holds a run \(checkpoint_last\.pth, log\.jsonl\); pass --resume"):
        train_module.main(train_argv(vqa, output, overrides=("max_steps=1", "seed=7")))
    assert all(torch.equal(value, first[key]) for key, value in torch.load(output / LAST, weights_only=True)["model"].items())
    with pytest.raises(ValueError, match="contradict"):
        train_module.main(train_argv(vqa, output, "--resume", str(output), "--overwrite"))
    train_module.main(train_argv(vqa, output, "--resume", str(output)))
    (output / "checkpoint_step9.pth").write_bytes(b"old")
    (output / "notes.txt").write_text("mine")
    train_module.main(train_argv(vqa, output, "--overwrite", overrides=("max_steps=1", "seed=7")))
    assert "--overwrite: removed" in capsys.readouterr().err
    assert not (output / "checkpoint_step9.pth").exists() and (output / "notes.txt").read_text() == "mine"
    assert [line["step"] for line in read_log(output / "log.jsonl")] == [1]


# item 4
def test_a_second_run_into_a_locked_output_is_refused_and_a_stale_lock_reported(tmp_path, vqa, capsys):
    output = tmp_path / "run"
    output.mkdir()
    with OutputLock(output):
        with pytest.raises(ValueError, match=rf"is in use by another run \(pid {os.getpid()} on host .*\.mplug_run\.lock"):
            train_module.main(train_argv(vqa, output))
    assert not (output / LAST).exists()
    (output / ".mplug_run.lock").write_text("pid 999999999 on host gone\n")
    train_module.main(train_argv(vqa, output))
    assert "taking over the lock of a run that ended without releasing it (pid 999999999 on host gone" in capsys.readouterr().err
    assert (output / ".mplug_run.lock").read_text() == ""


# item 5
def test_a_diverging_run_stops_keeps_the_good_checkpoint_and_logs_strict_json(tmp_path, vqa):
    """lr 1e6 without clipping: step 1 is finite and saved, step 2's loss is NaN: the run raises, naming the config
    key, checkpoint_last.pth keeps step 1's finite weights, and log.jsonl is strict JSON ("nan" as text)."""
    output = tmp_path / "run"
    overrides = ("optimizer.lr=1e6", "optimizer.lr_visual=1e6", "max_grad_norm=0", "epochs=6", "save_every=1")
    with pytest.raises(train_module.DivergedError if hasattr(train_module, "DivergedError") else RuntimeError,
                       match=r"step 2: the loss \(nan\).*skip_non_finite_steps = 0"):
        train_module.main(train_argv(vqa, output, overrides=overrides))
    state = torch.load(output / LAST, weights_only=True)
    assert state["progress"]["step"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values() if value.is_floating_point())

    def refuse(constant):
        raise AssertionError(f"log.jsonl holds the bare constant {constant}")

    lines = [json.loads(line, parse_constant=refuse) for line in (output / "log.jsonl").read_text().splitlines()]
    assert [line["loss"] for line in lines][1] == "nan"


def test_skip_non_finite_steps_skips_that_many_before_stopping(tmp_path, vqa):
    overrides = ("optimizer.lr=1e6", "optimizer.lr_visual=1e6", "max_grad_norm=0", "epochs=6", "skip_non_finite_steps=2")
    with pytest.raises(RuntimeError, match=r"step 4: .*3 step\(s\) in a row .*skip_non_finite_steps = 2"):
        train_module.main(train_argv(vqa, tmp_path / "run", overrides=overrides))


def test_non_finite_weights_are_refused_on_load_and_on_save(tmp_path, vqa):
    weights = tiny("vqa").state_dict()
    name = "fusion_encoder.encoder.layer.0.attention.self.query.weight"
    broken = tmp_path / "nan.pth"
    own_checkpoint(broken, "vqa", **{name: torch.full_like(weights[name], float("nan"))})
    with pytest.raises(ValueError, match=rf"nan\.pth.*holds NaN or inf in 1 tensors, e.g. \['{name}'\]"):
        evaluate_module.main(evaluate_argv(vqa, broken, tmp_path / "eval"))
    with pytest.raises(ValueError, match="holds NaN or inf"):
        load_weights(tiny("vqa"), broken, None, partial=True)
    model = tiny("vqa")
    with torch.no_grad():
        model.get_parameter(name).fill_(float("inf"))
    job = type("Job", (), {"model": model})()
    with pytest.raises(RuntimeError, match=rf"step 3: 1 weights hold NaN or inf, e.g. \['{name}'\]; not saved"):
        train_module.save(job, train_module.Progress(0, 3, 3))


# items 10, 16
def test_our_checkpoints_move_between_tasks_reporting_what_was_dropped_and_added(tmp_path):
    pretrained = own_checkpoint(tmp_path / "pretrain.pth", "pretrain", seed=1)
    model = tiny("vqa")
    result = load_weights(model, tmp_path / "pretrain.pth", None)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert {key.split(".")[0] for key in result.ignored_keys} == {
        "visual_encoder_m", "text_encoder_m", "fusion_encoder_m", "text_decoder_m", "vision_proj_m", "text_proj_m", "mlm_head_m"}
    assert all(torch.equal(value, pretrained[key]) for key, value in model.state_dict().items())

    vqa_state = own_checkpoint(tmp_path / "vqa.pth", "vqa", seed=2)
    ve = tiny("ve")
    result = load_weights(ve, tmp_path / "vqa.pth", "ve")
    assert {key.split(".")[0] for key in result.missing_keys} == {"ve_head", "nlvr_head"} and result.ignored_keys == []
    assert all(torch.equal(ve.state_dict()[key], value) for key, value in vqa_state.items())

    retrieval = tiny("retrieval")
    load_weights(retrieval, tmp_path / "vqa.pth", None)
    assert torch.equal(retrieval.visual_encoder_m.state_dict()["visual.conv1.weight"], vqa_state["visual_encoder.visual.conv1.weight"])


def test_a_refused_load_of_our_checkpoint_changes_no_weight(tmp_path):
    """Every tensor is checked before any is written: a shape change in the last tensor, a dtype-kind change or a
    foreign key leaves the model as it was."""
    weights = tiny("vqa").state_dict()
    last = list(weights)[-1]
    cases = {"shape": {last: torch.zeros(3)}, "kind": {last: weights[last].long()},
             "foreign": {"somewhere_else.weight": torch.zeros(2)}}
    for what, change in cases.items():
        path = tmp_path / f"{what}.pth"
        own_checkpoint(path, "vqa", seed=3, **change)
        model = tiny("vqa")
        before = {key: value.clone() for key, value in model.state_dict().items()}
        with pytest.raises(ValueError, match=rf"{what}\.pth"):
            load_weights(model, path, None)
        assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items()), what
    load_weights(tiny("vqa"), tmp_path / "foreign.pth", None, partial=True)


# item 11
def test_evaluate_checks_its_output_before_any_work(tmp_path, vqa, monkeypatch):
    checkpoint = tmp_path / "own.pth"
    own_checkpoint(checkpoint, "vqa")
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "vqa_result.json").write_text("[]")

    def no_generation(*args, **kwargs):
        raise AssertionError("the output should have been refused before the generation")

    monkeypatch.setattr(evaluate_module, "generate", no_generation)
    with pytest.raises(ValueError, match=r"eval.*already holds vqa_result\.json; pass --overwrite"):
        evaluate_module.main(evaluate_argv(vqa, checkpoint, tmp_path / "eval"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"a_file/out.*cannot be written"):
        evaluate_module.main(evaluate_argv(vqa, checkpoint, tmp_path / "a_file" / "out"))
    (tmp_path / "taken" / "metrics.json").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"metrics\.json is a folder"):
        evaluate_module.main(evaluate_argv(vqa, checkpoint, tmp_path / "taken"))
    monkeypatch.undo()
    scores = evaluate_module.main(evaluate_argv(vqa, checkpoint, tmp_path / "eval", "--overwrite"))
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text()) == scores


# item 12
def test_log_with_a_torn_last_line_is_trimmed_and_a_foreign_log_is_named(tmp_path, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\n{"step": 3, "lo')
    train_module.keep_log_lines_until(log, 5)
    assert [line["step"] for line in read_log(log)] == [1, 2]
    assert "dropped its torn last line 3" in capsys.readouterr().err
    log.write_text('{"time": 1}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl: line 1 has no integer 'step'"):
        train_module.keep_log_lines_until(log, 5)
    log.write_text('{"step": 1\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"log\.jsonl: line 1 is not JSON"):
        train_module.keep_log_lines_until(log, 5)


# item 15
def test_stale_temporaries_of_a_killed_save_are_removed_at_start(tmp_path, capsys):
    (tmp_path / ".checkpoint_last.pth.k2j4_x.tmp").write_bytes(b"\0" * 1000)
    (tmp_path / ".log.jsonl.abc.tmp").write_text("x")
    (tmp_path / ".someone_else.tmp").write_text("kept")
    open_run_output(tmp_path, None, False).release()
    assert sorted(path.name for path in tmp_path.iterdir()) == [".mplug_run.lock", ".someone_else.tmp"]
    assert "removed 2 temporary file(s)" in capsys.readouterr().err


# item 17
def test_resume_refuses_another_length_or_process_count(tmp_path, vqa):
    output = tmp_path / "run"
    train_module.main(train_argv(vqa, output))
    with pytest.raises(ValueError, match=r"max_steps: checkpoint 1, now 2"):
        train_module.main(train_argv(vqa, output, "--resume", str(output), overrides=("max_steps=2",)))
    with pytest.raises(ValueError, match=r"epochs: checkpoint 1, now 3"):
        train_module.main(train_argv(vqa, output, "--resume", str(output), overrides=("max_steps=1", "epochs=3")))
    with pytest.raises(ValueError, match=r"written by a run of 2 process\(es\), this run has 1.*resume with 2"):
        check_same_world_size({"rng": [{}, {}]}, 1, output)


# item 18
def test_written_files_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        atomic_write(tmp_path / "x.json", lambda stream: stream.write("{}"), binary=False)
        assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o644
        os.umask(0o077)
        atomic_write(tmp_path / "y.json", lambda stream: stream.write("{}"), binary=False)
        assert stat.S_IMODE((tmp_path / "y.json").stat().st_mode) == 0o600
    finally:
        os.umask(previous)


def test_a_truncated_checkpoint_is_named(tmp_path):
    own_checkpoint(tmp_path / "whole.pth", "vqa")
    data = (tmp_path / "whole.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.pth.*is not a PyTorch checkpoint"):
        load_weights(tiny("vqa"), tmp_path / "cut.pth", None)


def test_deeply_nested_annotation_json_is_named(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200000 + "]" * 200000)
    with pytest.raises(ValueError, match=r"deep\.json: annotation file nests its JSON too deeply"):
        load_json_list(str(path))


def test_the_authors_loader_refuses_a_dtype_kind_change_and_repeated_grounding_ids():
    config = MPLUGConfig.tiny()
    shapes, _ = authors_layout(config, "pretrained", momentum=False)
    state = random_state(shapes, seed=3)
    state["itm_head.weight"] = state["itm_head.weight"].long()
    model = MPLUG(config)
    before = model.itm_head.weight.clone()
    with pytest.raises(ValueError, match=r"itm_head\.weight.*dtype torch\.int64.*not cast"):
        load_official_checkpoint(model, state)
    assert torch.equal(model.itm_head.weight, before)
    state = random_state(authors_layout(config, "grounding", momentum=False)[0], seed=4)
    state["prefix_ids"] = torch.tensor([344])
    state["target_ids"] = torch.full(state["target_ids"].shape, 345, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prefix_ids / target_ids must be .* distinct token ids"):
        load_official_checkpoint(MPLUG(config), state, task="grounding")


def test_a_non_finite_step_leaves_the_weights_and_adam_state_alone():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)

    def step_module(scale):
        return (weight * scale).sum()

    losses, finite = train_module.train_step(step_module, {"scale": torch.tensor(float("nan"))}, optimizer, scheduler,
                                             [weight], 1.0, torch.device("cpu"))
    assert not finite and torch.isnan(losses["loss"]) and torch.equal(weight.detach(), torch.ones(3))
    assert optimizer.state_dict()["state"] == {}
    _, finite = train_module.train_step(step_module, {"scale": torch.tensor(2.0)}, optimizer, scheduler, [weight], 0.0,
                                        torch.device("cpu"))
    assert finite and not torch.equal(weight.detach(), torch.ones(3))


def test_result_files_are_strict_json(tmp_path):
    evaluate_module.write_json_atomic(tmp_path / "m.json", {"score": float("nan"), "rows": [float("-inf"), 1.0]})
    assert json.loads((tmp_path / "m.json").read_text(), parse_constant=lambda c: None) == {"score": "nan", "rows": ["-inf", 1.0]}
