"""nn.CoAttention: BERT cross-attention semantics against a float64 transcription of the math."""
from __future__ import annotations

import pytest
import torch

from mplug_kernels.nn import CoAttention
from attention_testing import DEVICE, KERNEL_BACKENDS, skip_unless_supported


def _bert_cross_attention(module: CoAttention, text, vision, keep):
    """LN(t + dense(softmax(QK^T / sqrt(d) + mask) V)) written out in float64."""
    heads = module.num_heads
    p = {name: w.detach().double() for name, w in module.named_parameters()}
    t, v = text.double(), vision.double()
    split = lambda x: x.unflatten(-1, (heads, -1)).transpose(1, 2)
    q = split(t @ p["self.query.weight"].T + p["self.query.bias"])
    k = split(v @ p["self.key.weight"].T + p["self.key.bias"])
    val = split(v @ p["self.value.weight"].T + p["self.value.bias"])
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + (1.0 - keep.double())[:, None, None, :] * -10000.0
    context = (torch.softmax(scores, dim=-1) @ val).transpose(1, 2).flatten(2)
    hidden = t + context @ p["output.dense.weight"].T + p["output.dense.bias"]
    return torch.nn.functional.layer_norm(
        hidden, hidden.shape[-1:], p["output.LayerNorm.weight"], p["output.LayerNorm.bias"], eps=1e-12
    )


def _module_and_inputs(backend, kv_width=48, seed=0):
    torch.manual_seed(seed)
    module = CoAttention(64, 4, kv_width=kv_width, backend=backend).to(DEVICE)
    text = torch.randn(2, 7, 64, device=DEVICE)
    vision = torch.randn(2, 33, kv_width, device=DEVICE)
    keep = torch.ones(2, 33, dtype=torch.bool, device=DEVICE)
    keep[1, 20:] = False
    return module, text, vision, keep


@pytest.mark.parametrize("backend", ["reference", "sdpa"] + KERNEL_BACKENDS)
@pytest.mark.parametrize("mask_form", ["bool", "additive_2d", "additive_4d"])
def test_matches_bert_math(backend, mask_form):
    module, text, vision, keep = _module_and_inputs(backend)
    additive = (1.0 - keep.float()) * -10000.0
    mask = {"bool": keep, "additive_2d": additive, "additive_4d": additive[:, None, None, :]}[mask_form]
    q_probe = text.new_empty(2, 7, 4, 16)
    kv_probe = text.new_empty(2, 33, 4, 16)
    skip_unless_supported(backend, q_probe, [kv_probe], [kv_probe], [keep], return_lse=False)
    out = module(text, vision, mask)
    expected = _bert_cross_attention(module, text, vision, keep)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


def test_parameter_names_match_bert_cross_attention():
    names = {name for name, _ in CoAttention(64, 4, kv_width=48).named_parameters()}
    expected = {f"{m}.{p}" for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm") for p in ("weight", "bias")}
    assert expected <= names


def test_gradients_reach_every_parameter():
    module, text, vision, keep = _module_and_inputs("reference")
    module(text, vision, keep).pow(2).sum().backward()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_bad_mask_shape_is_named():
    module, text, vision, keep = _module_and_inputs("reference")
    with pytest.raises(ValueError, match="attention mask must be"):
        module(text, vision, keep[:, :5])
    with pytest.raises(TypeError, match="attention mask must be bool"):
        module(text, vision, keep.long())
