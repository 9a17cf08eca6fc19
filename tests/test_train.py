"""mplug.runtime and mplug.train on the CPU: weights loading, one process, 2-process gloo DDP, kill and resume,
atomic checkpoints, clear errors."""
import os

import pytest
import torch

from mplug import MPLUG, MPLUGConfig
from mplug.runtime import CHECKPOINT_FORMAT, all_gather_objects, autocast, init_distributed, is_main, load_weights
from test_checkpoint import authors_layout, random_state


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
