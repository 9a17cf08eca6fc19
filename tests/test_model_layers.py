"""Every mplug layer type against a direct float64 transcription of SPEC.md's math, on every backend.

The reference backend runs the modules in float64 (tight tolerance); the kernel backends run them in
float32 against the float64 transcription. Outputs and input gradients are both compared.
"""
from __future__ import annotations

import math

import pytest
import torch

from mplug import MPLUGConfig
from mplug.model.decoder import TextDecoder
from mplug.model.fusion import CoAttentionLayer, FusionEncoder, connected_attention
from mplug.model.text import Embeddings, TextEncoder, TextLayer
from mplug.model.vision import ResidualAttentionBlock, VisualEncoder
from mplug_kernels.backends import BACKENDS, AttentionCall

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ALL_BACKENDS = ["reference", "sdpa", "triton", "cuda"]
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4}


def backend_dtype(backend: str) -> torch.dtype:
    """float64 on the reference backend (exact wiring check), float32 elsewhere; skips unusable backends."""
    dtype = torch.float64 if backend == "reference" else torch.float32
    call = AttentionCall(DEVICE.type, dtype, 16, 2, True, True, False)
    reasons = BACKENDS[backend].reasons(call)
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")
    return dtype


def tiny(**changes) -> MPLUGConfig:
    return MPLUGConfig.tiny(**changes)


def build(module_class, config, dtype, seed=0):
    torch.manual_seed(seed)
    module = module_class(config).to(DEVICE, dtype).eval()
    for parameter in module.parameters():
        with torch.no_grad():
            parameter.add_(0.05 * torch.randn_like(parameter))
    return module


def padding_mask(batch: int, length: int, keep_lengths) -> torch.Tensor:
    return (torch.arange(length)[None, :] < torch.tensor(keep_lengths)[:, None]).to(DEVICE)


# ---- the transcription (float64, straight from SPEC.md) ----

def p(x: torch.Tensor) -> torch.Tensor:
    return x.detach().double()


def linear(x, layer):
    out = x @ p(layer.weight).T
    return out if layer.bias is None else out + p(layer.bias)


def layer_norm(x, norm):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * p(norm.weight) + p(norm.bias)


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def attention(q, k, v, heads, keep=None):
    """q [B, Lq, C], k/v [B, Lk, C], keep bool [B, Lq, Lk] (None = all) -> [B, Lq, C]; empty rows give 0."""
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
    if keep is not None:
        scores = scores.masked_fill(~keep[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return (probs @ split(v)).transpose(1, 2).flatten(2)


def key_keep(key_mask, q_len):
    return None if key_mask is None else key_mask[:, None, :].expand(-1, q_len, -1)


def bert_attention(x, memory, block, keep):
    """LN(x + dense(Attn(q = x Wq, k = memory Wk, v = memory Wv)))."""
    projections = block.self
    context = attention(linear(x, projections.query), linear(memory, projections.key), linear(memory, projections.value), block.num_heads, keep)
    return layer_norm(x + linear(context, block.output.dense), block.output.LayerNorm)


def feed_forward(x, layer):
    return layer_norm(x + linear(gelu(linear(x, layer.intermediate.dense)), layer.output.dense), layer.output.LayerNorm)


def vit_block(x, block):
    h = layer_norm(x, block.ln_1)
    q, k, v = (h @ p(w).T + p(b) for w, b in zip(block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)))
    x = x + linear(attention(q, k, v, block.attn.num_heads), block.attn.out_proj)
    hidden = linear(layer_norm(x, block.ln_2), block.mlp.c_fc)
    return x + linear(hidden * torch.sigmoid(1.702 * hidden), block.mlp.c_proj)


def visual_encoder(images, encoder):
    visual = encoder.visual
    patch = visual.conv1.kernel_size[0]
    patches = images.unfold(2, patch, patch).unfold(3, patch, patch)  # [B, 3, n, n, P, P]
    patches = patches.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)
    x = patches @ p(visual.conv1.weight).flatten(1).T
    cls = p(visual.class_embedding).expand(x.shape[0], 1, -1)
    x = layer_norm(torch.cat([cls, x], dim=1) + p(visual.positional_embedding), visual.ln_pre)
    for block in visual.transformer.resblocks:
        x = vit_block(x, block)
    x = layer_norm(x, visual.ln_post)
    if encoder.projected:
        x = layer_norm(linear(x, encoder.visn_fc), encoder.visn_layer_norm)
    return x


def embeddings(ids, module, past=0):
    positions = torch.arange(past, past + ids.shape[1], device=ids.device)
    x = p(module.word_embeddings.weight)[ids] + p(module.position_embeddings.weight)[positions]
    return layer_norm(x + p(module.token_type_embeddings.weight)[0], module.LayerNorm)


def co_attention_layer(x, x_mask, memory, memory_mask, layer):
    x = bert_attention(x, x, layer.attention, key_keep(x_mask, x.shape[1]))
    x = bert_attention(x, memory, layer.crossattention, key_keep(memory_mask, x.shape[1]))
    return feed_forward(x, layer)


def connected_layer(v, t, v_mask, t_mask, layer):
    """x = [v; t]; x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)); split; v = v + v_new."""
    x = torch.cat([v, t], dim=1)
    ones = lambda y: torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)
    mask = torch.cat([v_mask if v_mask is not None else ones(v), t_mask if t_mask is not None else ones(t)], dim=1)
    x = feed_forward(bert_attention(x, x, layer.attention, key_keep(mask, x.shape[1])), layer)
    return v + x[:, : v.shape[1]], x[:, v.shape[1]:]


def fusion_encoder(v, v_mask, t, t_mask, module, config):
    for k in range(config.fusion_layers):
        layer = module.encoder.layer[k]
        if config.is_connected_layer(k):
            v, t = connected_layer(v, t, v_mask, t_mask, layer)
        elif config.fusion == "two_way":
            v, t = co_attention_layer(v, v_mask, t, t_mask, module.vision_encoder.layer[k]), co_attention_layer(t, t_mask, v, v_mask, layer)
        else:
            t = co_attention_layer(t, t_mask, v, v_mask, layer)
    return v, t


def text_decoder(ids, mask, memory, memory_masks, decoder):
    x = embeddings(ids, decoder.bert.embeddings)
    length = ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=ids.device).tril()
    memory_x = torch.cat(memory, dim=1)
    memory_keep = torch.cat(memory_masks, dim=1)
    for layer in decoder.bert.encoder.layer:
        x = bert_attention(x, x, layer.attention, causal[None] & mask[:, None, :])
        x = bert_attention(x, memory_x, layer.crossattention, key_keep(memory_keep, length))
        x = feed_forward(x, layer)
    head = decoder.cls.predictions
    x = layer_norm(gelu(linear(x, head.transform.dense)), head.transform.LayerNorm)
    return x @ p(decoder.bert.embeddings.word_embeddings.weight).T + p(head.bias)


# ---- the comparison ----

def compare(ours_fn, reference_fn, inputs, dtype, seed=1):
    """Outputs and input gradients of ours_fn (in dtype) vs reference_fn (float64) on the same float64 inputs."""
    ours_inputs = [x.to(dtype).requires_grad_() for x in inputs]
    reference_inputs = [x.clone().requires_grad_() for x in inputs]
    ours, expected = ours_fn(*ours_inputs), reference_fn(*reference_inputs)
    ours = ours if isinstance(ours, tuple) else (ours,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    generator = torch.Generator().manual_seed(seed)
    seeds = [torch.randn(e.shape, generator=generator, dtype=torch.float64).to(DEVICE) for e in expected]
    tolerance = TOLERANCE[dtype]
    for i, (o, e) in enumerate(zip(ours, expected)):
        assert o.shape == e.shape, f"output {i}: shape {tuple(o.shape)} != {tuple(e.shape)}"
        torch.testing.assert_close(o.double(), e, atol=tolerance, rtol=tolerance, msg=lambda m: f"output {i}: {m}")
    ours_grads = torch.autograd.grad(sum((o.double() * s).sum() for o, s in zip(ours, seeds)), ours_inputs)
    expected_grads = torch.autograd.grad(sum((e * s).sum() for e, s in zip(expected, seeds)), reference_inputs)
    for i, (o, e) in enumerate(zip(ours_grads, expected_grads)):
        scale = e.abs().max().item() + 1.0
        torch.testing.assert_close(o.double(), e, atol=tolerance * scale, rtol=tolerance, msg=lambda m: f"grad of input {i}: {m}")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(DEVICE)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_vit_block_matches_transcription(backend):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend)
    block = build(ResidualAttentionBlock, config, dtype)
    compare(block, lambda x: vit_block(x, block), [randn(2, 5, config.vision_width)], dtype)


@pytest.mark.parametrize("vision_width", [48, 64], ids=["projected", "unprojected"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_visual_encoder_matches_transcription(backend, vision_width):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend, vision_width=vision_width, vision_heads=vision_width // 16, image_size=16)
    encoder = build(VisualEncoder, config, dtype)
    compare(encoder, lambda images: visual_encoder(images, encoder), [randn(2, 3, 16, 16)], dtype)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_text_layer_matches_transcription(backend):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend)
    layer = build(TextLayer, config, dtype)
    mask = padding_mask(2, 6, [6, 4])
    compare(
        lambda x: layer(x, mask),
        lambda x: feed_forward(bert_attention(x, x, layer.attention, key_keep(mask, 6)), layer),
        [randn(2, 6, 64)],
        dtype,
    )


@pytest.mark.parametrize("past", [0, 5])
def test_embeddings_positions_continue_from_past(past):
    config = tiny()
    module = build(Embeddings, config, torch.float64)
    ids = torch.randint(0, config.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    torch.testing.assert_close(module(ids, past), embeddings(ids, module, past), atol=1e-12, rtol=1e-12)


def test_text_encoder_matches_transcription():
    config = tiny(attn_backend="reference")
    encoder = build(TextEncoder, config, torch.float64)
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = padding_mask(2, 6, [6, 4])
    expected = embeddings(ids, encoder.embeddings)
    for layer in encoder.encoder.layer:
        expected = feed_forward(bert_attention(expected, expected, layer.attention, key_keep(mask, 6)), layer)
    torch.testing.assert_close(encoder(ids, mask), expected, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_co_attention_layer_matches_transcription(backend):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend)
    layer = build(CoAttentionLayer, config, dtype)
    text_mask, vision_mask = padding_mask(2, 4, [4, 2]), padding_mask(2, 6, [6, 3])
    compare(
        lambda t, v: layer(t, text_mask, v, vision_mask),
        lambda t, v: co_attention_layer(t, text_mask, v, vision_mask, layer),
        [randn(2, 4, 64), randn(2, 6, 64, seed=1)],
        dtype,
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_connected_layer_matches_transcription(backend):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend)
    layer = build(lambda c: connected_attention(c), config, dtype)
    text_mask, vision_mask = padding_mask(2, 4, [4, 2]), padding_mask(2, 6, [6, 3])
    compare(
        lambda v, t: layer(v, t, vision_mask, text_mask),
        lambda v, t: connected_layer(v, t, vision_mask, text_mask, layer),
        [randn(2, 6, 64), randn(2, 4, 64, seed=1)],
        dtype,
    )


@pytest.mark.parametrize("fusion", ["skip", "connected", "two_way"])
@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_fusion_encoder_matches_transcription(backend, fusion):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend, fusion=fusion)
    encoder = build(FusionEncoder, config, dtype)
    text_mask, vision_mask = padding_mask(2, 4, [4, 3]), padding_mask(2, 6, [6, 5])
    compare(
        lambda v, t: encoder(v, vision_mask, t, text_mask),
        lambda v, t: fusion_encoder(v, vision_mask, t, text_mask, encoder, config),
        [randn(2, 6, 64), randn(2, 4, 64, seed=1)],
        dtype,
    )


@pytest.mark.parametrize("backend", ALL_BACKENDS)
def test_text_decoder_matches_transcription(backend):
    dtype = backend_dtype(backend)
    config = tiny(attn_backend=backend, decoder_layers=1)
    decoder = build(TextDecoder, config, dtype)
    ids = torch.randint(0, config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = padding_mask(2, 5, [5, 3])
    memory_masks = (padding_mask(2, 6, [6, 4]), padding_mask(2, 3, [3, 1]))
    compare(
        lambda v, t: decoder(ids, mask, memory=(v, t), memory_masks=memory_masks),
        lambda v, t: text_decoder(ids, mask, (v, t), memory_masks, decoder),
        [randn(2, 6, 64), randn(2, 3, 64, seed=1)],
        dtype,
    )


def test_old_fusion_name_coattn_reads_as_two_way():
    """Configs and checkpoints written before the rename say fusion="coattn"."""
    assert MPLUGConfig.tiny(fusion="coattn").fusion == "two_way"
    with pytest.raises(ValueError, match="two_way"):
        MPLUGConfig.tiny(fusion="cotattn")


def test_stride_rule_layer_pattern():
    """SPEC.md: base co, co, co, CONNECTED, co, co; large all co-attention; "connected" all connected."""
    pattern = lambda config: ["C" if config.is_connected_layer(k) else "c" for k in range(config.fusion_layers)]
    assert pattern(MPLUGConfig.base()) == list("cccCcc")
    assert pattern(MPLUGConfig.large()) == list("cccccc")
    assert pattern(MPLUGConfig.base(fusion="connected")) == list("CCCCCC")
    assert pattern(MPLUGConfig.base(fusion="two_way")) == list("cccccc")
    assert pattern(MPLUGConfig.tiny()) == list("ccCc")
    encoder = FusionEncoder(MPLUGConfig.tiny())
    assert [type(layer).__name__ for layer in encoder.encoder.layer] == [
        "CoAttentionLayer", "CoAttentionLayer", "ConnectedAttention", "CoAttentionLayer"
    ]
