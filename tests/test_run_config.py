"""mplug.run.run_config: shipped configs (every value with its source), YAML files, key=value overrides, checks."""
import re

import pytest
import yaml

from mplug.model.config import MPLUGConfig
from mplug.run.run_config import CONFIG_DIR, PATH_KEYS, SHIPPED, allowed_keys, build_model_config, load_config
from tiny_dataset import write_tiny_dataset

AUTHORS_VALUES = {  # (lr, lr_visual, epochs, batch_size_train, image_size) read off the authors' YAMLs
    "vqa_base": (3e-5, 5e-6, 8, 128, 384), "vqa_large": (3e-5, 5e-6, 8, 256, 336),
    "caption_base": (1e-5, 5e-6, 5, 64, 384), "caption_large": (1e-5, 5e-6, 5, 64, 336),
    "retrieval_large": (1e-5, 2e-6, 8, 128, 336),
    "pretrain_base": (1e-4, 1e-5, 30, 256, 256), "pretrain_large": (5e-5, 5e-6, 30, 128, 224),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_with_its_task_size_and_authors_values(name):
    cfg = load_config(name)
    task, size = name.split("_")[:2]  # caption_base_scst: task caption, size base
    assert (cfg["task"], cfg["model"]) == (task, size)
    assert all(cfg[key] is None for key in PATH_KEYS), "shipped data paths are placeholders the user sets"
    if name in AUTHORS_VALUES:
        got = (cfg["optimizer"]["lr"], cfg["optimizer"]["lr_visual"], cfg["epochs"], cfg["batch_size_train"], cfg["image_size"])
        assert got == AUTHORS_VALUES[name]
    model = build_model_config(cfg)
    assert model.image_size == cfg["image_size"] and model.vision_width == {"base": 768, "large": 1024}[size]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_value_says_where_it_comes_from(name):
    text = (CONFIG_DIR / f"{name}.yaml").read_text()
    keys = set(yaml.safe_load(text)) | {f"{group}.{key}" for group in ("optimizer", "schedule")
                                        for key in yaml.safe_load(text)[group]}
    assert {key for key in allowed_keys()} <= keys, "a shipped config sets every key"
    for line in text.splitlines():
        if re.match(r"^\s*\w+: \S", line) and line.split(":")[0] not in PATH_KEYS:
            assert "#" in line, f"{name}: no source comment on {line!r}"


def test_overrides_reach_nested_keys_and_parse_yaml_values(tmp_path):
    cfg = load_config("vqa_base", ["optimizer.lr=1e-4", "epochs=2", "train_file=[a.json, b.json]", "max_steps=null",
                                   "grad_checkpointing=false", "model=tiny", "image_size=32"])
    assert cfg["optimizer"]["lr"] == 1e-4 and isinstance(cfg["optimizer"]["lr"], float)
    assert cfg["epochs"] == 2 and cfg["max_steps"] is None and cfg["grad_checkpointing"] is False
    assert [p.rsplit("/", 1)[1] for p in cfg["train_file"]] == ["a.json", "b.json"]
    assert build_model_config(cfg) == MPLUGConfig.tiny(image_size=32)


def test_relative_paths_resolve_against_the_yaml_folder_and_overrides_against_cwd(tmp_path, monkeypatch):
    config = write_tiny_dataset(tmp_path / "data", "caption")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(config), ["test_file=elsewhere/test.json"])
    assert cfg["train_file"] == str(tmp_path / "data" / "caption_train.json")
    assert cfg["image_root"] == str(tmp_path / "data" / "coco")
    assert cfg["test_file"] == str(tmp_path / "elsewhere" / "test.json")


@pytest.mark.parametrize("override, message", [
    ("no_such_key=1", "unknown config key 'no_such_key'; allowed keys: task, model"),
    ("optimizer.momentum=0.9", "unknown config key 'optimizer.momentum'"),
    ("optimizer=1", "unknown config key 'optimizer'; allowed keys:"),
    ("epochs", "must be 'key=value'"),
    ("epochs=0", "'epochs' must be an int >= 1"),
    ("optimizer.lr=fast", "'optimizer.lr' must be a number"),
    ("task=detection", "'task' must be one of"),
    ("model=huge", "'model' must be one of"),
    ("image_size=100", "multiple of patch_size"),
    ("schedule.warmup_ratio=0.1", "not both"),
    ("optimizer.betas=[0.9]", "'optimizer.betas' must be two floats"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config("vqa_base", [override])


def test_bad_config_files(tmp_path):
    with pytest.raises(ValueError, match="neither a shipped config"):
        load_config(str(tmp_path / "missing.yaml"))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("task: vqa\nlearning_rate: 1.0\n")
    with pytest.raises(ValueError, match=re.escape(f"{unknown}: unknown config key 'learning_rate'")):
        load_config(str(unknown))
    not_mapping = tmp_path / "list.yaml"
    not_mapping.write_text("- 1\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_config(str(not_mapping))
