"""HyperAttention against our plain PyTorch transcription of mPLUG-Owl3's published hyper attention.

The transcription (``owl3_hyper_attention`` below) follows the mPLUG-Owl3-7B-241101 release's
modeling_hyper_qwen2.py, read in its line-for-line port PaddlePaddle/PaddleMIX @ 15ff272,
paddlemix/models/mPLUGOwl3/modeling_hyper_qwen2.py (line numbers counted by hand in that copy, good to a few lines):
- ``HyperQwen2SdpaAttention.hyperattention`` (about 339-470): q/k/v_proj, Qwen2 rotary at position_ids (0..L-1) on
  q and k, ``repeat_kv``, ``v_kv_proj`` on all images, then per sample (a Python loop): a dense mask
  cat([t2vmask, tril], keys) where t2vmask[t, image] = not (t < media_start), each image's Lv keys laid out
  "(H KV D)", rotated by ``apply_mi_rope``, K/V = cat([visual, text]), one SDPA; a sample without images runs causal
  SDPA; then o_proj. Owl3 passes a bool mask (True = take part, the comment quoting torch's SDPA docs at about 454;
  the port casts it for Paddle, we keep torch's bool mask). This path applies no padding mask (tril only), so text
  padding is on the right and only real tokens are compared (padded rows get a zero output gradient).
- ``apply_mi_rope`` (about 309-329) with ``RotaryEmbedding`` (115-152) and ``apply_rotary_pos_emb_core`` (226-252):
  every key of an image is rotated by the rotary table's row at the image's media_start, in float32.
- ``Qwen2RotaryEmbedding`` (84-112: float32 cos/sin cast to the input's dtype), ``apply_rotary_pos_emb`` and
  ``rotate_half`` (155-187), ``repeat_kv`` (205-214).
- ``HyperQwen2DecoderLayer.forward`` (about 620-625) normalises the image embeddings with the layer's own
  ``input_layernorm`` before the attention: both the transcription and HyperAttention take normalised inputs.

The oracle is the transcription in float64; the budget of our layer in float32/float16/bfloat16 is twice the error
of the transcription run in that dtype (flash-attn's rule), outputs and every input and parameter gradient.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from attention_testing import DEVICE, assert_within_budget, random_tensor
from mplug_kernels.backends import BACKENDS, AttentionCall
from mplug_kernels.backends.base import Positions
from mplug_kernels.nn import HyperAttention, pack_images

HIDDEN, HEADS, KV_HEADS, TEXT, IMAGE_TOKENS, THETA = 128, 4, 2, 24, 5, 10000.0
# media_offset (each sample's image positions) and each sample's real text length (the rest is right padding).
# "mixed": 1, 3 and 8 images at different positions, a sample with no image, 8 video frames at one position then an
# image, text padding.
SCENARIOS = {
    "one_image_each": ([[3], [0], [17]], [24, 24, 24]),
    "eight_images_each": ([[0, 2, 4, 6, 8, 10, 12, 14], [1, 4, 7, 10, 13, 16, 19, 22], [3, 3, 5, 9, 9, 11, 20, 21]],
                          [24, 24, 22]),
    "mixed": ([[3], [0, 1, 20], [1, 4, 7, 10, 13, 16, 19, 22], [], [6] * 8 + [12]], [24, 21, 24, 18, 20]),
}
BACKEND_DTYPES = [("reference", torch.float32), ("sdpa", torch.float32), ("sdpa", torch.float16),
                  ("sdpa", torch.bfloat16), ("triton", torch.float32), ("triton", torch.float16),
                  ("cuda", torch.float16), ("cuda", torch.bfloat16)]


def rotate_half(x):
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def repeat_kv(x, groups):
    """[b, Hkv, s, D] -> [b, Hkv * groups, s, D], each K/V head repeated for its group of query heads."""
    batch, kv_heads, length, dim = x.shape
    return x[:, :, None].expand(batch, kv_heads, groups, length, dim).reshape(batch, kv_heads * groups, length, dim)


def mi_rope(key, starts, image_tokens, inverse_frequency):
    """apply_mi_rope: key [1, Hkv, n * Lv, D] rotated at its image's media start (table row), computed in float32."""
    freqs = torch.outer(starts.to(inverse_frequency.dtype), inverse_frequency)
    emb = torch.cat([freqs, freqs], dim=-1).repeat_interleave(image_tokens, dim=0)
    wide = key.to(inverse_frequency.dtype)
    return (wide * emb.cos() + rotate_half(wide) * emb.sin()).to(key.dtype)


def owl3_hyper_attention(params, hidden, image_embeds, media_offset):
    """Our transcription of Owl3's hyperattention: hidden [B, L, C], image_embeds [N, Lv, C], media_offset lists -> [B, L, C]."""
    dtype, (batch, length, width) = hidden.dtype, hidden.shape
    head_dim, table = width // HEADS, torch.float64 if hidden.dtype == torch.float64 else torch.float32
    project = lambda name, x: F.linear(x, params[f"{name}.weight"], params.get(f"{name}.bias"))
    heads_first = lambda x, heads: x.view(batch, length, heads, head_dim).transpose(1, 2)
    q = heads_first(project("q_proj", hidden), HEADS)
    k, v = heads_first(project("k_proj", hidden), KV_HEADS), heads_first(project("v_proj", hidden), KV_HEADS)
    inverse_frequency = 1.0 / THETA ** (torch.arange(0, head_dim, 2, dtype=table, device=DEVICE) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=table, device=DEVICE), inverse_frequency)
    cos, sin = torch.cat([freqs, freqs], -1).cos().to(dtype), torch.cat([freqs, freqs], -1).sin().to(dtype)
    q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
    groups = HEADS // KV_HEADS
    k, v = repeat_kv(k, groups), repeat_kv(v, groups)
    visual, image_tokens = project("v_kv_proj", image_embeds), image_embeds.shape[1]
    outs, image_start = [], 0
    for b, starts in enumerate(media_offset):
        starts = torch.tensor(starts, dtype=torch.long, device=DEVICE)
        if len(starts) == 0:
            outs.append(F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], is_causal=True))
            continue
        causal = torch.tril(torch.ones(length, length, device=DEVICE)).bool()
        t2v = ~(torch.arange(length, device=DEVICE)[:, None] < starts[None, :])
        full_mask = torch.cat([t2v.repeat_interleave(image_tokens, dim=1), causal], dim=1)[None, None]
        kv = visual[image_start:image_start + len(starts)].reshape(len(starts) * image_tokens, KV_HEADS, 2, head_dim)
        image_start += len(starts)
        visual_k = mi_rope(kv[:, :, 0].transpose(0, 1)[None], starts, image_tokens, inverse_frequency)
        visual_v = kv[:, :, 1].transpose(0, 1)[None]
        keys = torch.cat([repeat_kv(visual_k, groups), k[b:b + 1]], dim=2)
        values = torch.cat([repeat_kv(visual_v, groups), v[b:b + 1]], dim=2)
        outs.append(F.scaled_dot_product_attention(q[b:b + 1], keys, values, attn_mask=full_mask))
    return project("o_proj", torch.cat(outs).transpose(1, 2).reshape(batch, length, width))


def make_layer(seed, backend="reference"):
    """A HyperAttention whose parameters are N(0, 0.1^2) (sharper attention than the default init)."""
    layer = HyperAttention(HIDDEN, HEADS, KV_HEADS, rope_theta=THETA, backend=backend)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in layer.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return layer.to(DEVICE)


def scenario_inputs(name, seed):
    """(hidden [B, L, C], image_embeds [N, Lv, C], media_offset, attention_mask bool [B, L]) in float64."""
    media_offset, lengths = SCENARIOS[name]
    generator = torch.Generator().manual_seed(seed)
    hidden = random_tensor(len(lengths), TEXT, HIDDEN, dtype=torch.float64, generator=generator)
    images = random_tensor(sum(map(len, media_offset)), IMAGE_TOKENS, HIDDEN, dtype=torch.float64, generator=generator)
    mask = torch.arange(TEXT, device=DEVICE)[None, :] < torch.tensor(lengths, device=DEVICE)[:, None]
    return hidden, images, media_offset, mask


def ours(layer, hidden, image_embeds, media_offset, mask):
    images, positions, counts = pack_images(image_embeds, media_offset)
    return layer(hidden, images, positions, counts, attention_mask=mask)


def skip_unless_backend_takes(backend, dtype, media_offset, mask, backward):
    """Skip with the dispatcher's reasons when backend cannot run the layer's concat_attention call here."""
    batch, slots = len(media_offset), max(map(len, media_offset))
    q = torch.zeros(batch, TEXT, HEADS, HIDDEN // HEADS, dtype=dtype, device=DEVICE, requires_grad=backward)
    ks = [torch.zeros(batch, length, KV_HEADS, HIDDEN // HEADS, dtype=dtype, device=DEVICE)
          for length in (slots * IMAGE_TOKENS, TEXT)]
    keys = tuple(torch.zeros(k.shape[:2], dtype=torch.int32, device=DEVICE) for k in ks)
    call = AttentionCall.of(q, ks, ks, [mask, mask], False, Positions(keys, keys[1]))
    reasons = BACKENDS[backend].reasons(call)
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")


def run(which, layer, dtype, hidden, image_embeds, media_offset, mask, dout):
    """(out, gradients of sum(out * dout): inputs, then parameters; none when dout is None) of ``ours`` or ``owl3`` in dtype, with the names."""
    low = copy.deepcopy(layer).to(dtype)
    params = dict(low.named_parameters())
    x = hidden.detach().to(dtype).requires_grad_()
    images = image_embeds.detach().to(dtype).requires_grad_()
    with torch.set_grad_enabled(dout is not None):
        if which == "ours":
            out = ours(low, x, images, media_offset, mask)
        else:
            out = owl3_hyper_attention(params, x, images, media_offset)
    names = ["hidden", "image_embeds", *params]
    if dout is None:
        return out, [], names
    return out, torch.autograd.grad((out.double() * dout).sum(), [x, images, *params.values()]), names


@pytest.mark.parametrize("name", SCENARIOS)
def test_float64_reference_equals_the_transcription(name):
    layer = make_layer(seed=len(name)).double()
    hidden, image_embeds, media_offset, mask = scenario_inputs(name, seed=1)
    dout = torch.randn(hidden.shape, dtype=torch.float64, device=DEVICE) * mask[..., None]
    out, grads, names = run("ours", layer, torch.float64, hidden, image_embeds, media_offset, mask, dout)
    want_out, want_grads, _ = run("owl3", layer, torch.float64, hidden, image_embeds, media_offset, mask, dout)
    torch.testing.assert_close(out[mask], want_out[mask], rtol=0, atol=1e-12)
    for grad_name, got, want in zip(names, grads, want_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10, msg=lambda m: f"{grad_name}: {m}")


def _compare(backend, dtype, name, backward):
    hidden, image_embeds, media_offset, mask = scenario_inputs(name, seed=2)
    skip_unless_backend_takes(backend, dtype, media_offset, mask, backward)
    layer = make_layer(seed=3, backend=backend)
    dout = torch.randn(hidden.shape, dtype=torch.float64, device=DEVICE) * mask[..., None]
    args = (hidden, image_embeds, media_offset, mask, dout if backward else None)
    want_out, want_grads, names = run("owl3", layer, torch.float64, *args)
    base_out, base_grads, _ = run("owl3", layer, dtype, *args)
    out, grads, _ = run("ours", layer, dtype, *args)
    assert out.dtype == dtype
    assert_within_budget("out", out[mask], want_out[mask], base_out[mask], factor=2)
    for grad_name, got, want, base in zip(names, grads, want_grads, base_grads):
        assert_within_budget(f"d{grad_name}", got, want, base, factor=2, slack=1e-4)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_forward_within_twice_the_transcriptions_error(backend, dtype, name):
    _compare(backend, dtype, name, backward=False)


@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
@pytest.mark.parametrize("name", SCENARIOS)
def test_backward_within_twice_the_transcriptions_error(backend, dtype, name):
    _compare(backend, dtype, name, backward=True)


def test_text_only_is_owl3s_causal_path():
    layer = make_layer(seed=5).double()
    hidden = scenario_inputs("one_image_each", seed=6)[0]
    want = owl3_hyper_attention(dict(layer.named_parameters()), hidden, hidden.new_zeros(0, IMAGE_TOKENS, HIDDEN),
                                [[], [], []])
    torch.testing.assert_close(layer(hidden), want, rtol=0, atol=1e-12)
    no_slots = pack_images(hidden.new_zeros(0, IMAGE_TOKENS, HIDDEN), [[], [], []])
    assert no_slots[0].shape == (3, 0, IMAGE_TOKENS, HIDDEN)
    torch.testing.assert_close(layer(hidden, *no_slots), want, rtol=0, atol=1e-12)


def test_left_padding_with_shifted_positions_equals_the_unpadded_sample():
    """Owl3's path masks no padding (so pads go right); ours takes attention_mask, so left padding works too."""
    layer, pad = make_layer(seed=7).double(), 5
    generator = torch.Generator().manual_seed(8)
    hidden = random_tensor(1, TEXT, HIDDEN, dtype=torch.float64, generator=generator)
    images = random_tensor(1, 2, IMAGE_TOKENS, HIDDEN, dtype=torch.float64, generator=generator)
    image_positions = torch.tensor([[2, 9]], dtype=torch.int32, device=DEVICE)
    unpadded = layer(hidden, images, image_positions)
    padded_hidden = torch.cat([random_tensor(1, pad, HIDDEN, dtype=torch.float64, generator=generator), hidden], dim=1)
    positions = torch.arange(TEXT + pad, device=DEVICE)[None] - pad
    padded = layer(padded_hidden, images, image_positions, positions=positions, attention_mask=positions >= 0)
    torch.testing.assert_close(padded[:, pad:], unpadded, rtol=0, atol=1e-12)


def test_traces_whole_with_no_graph_break_or_host_sync():
    """torch.compile(fullgraph=True) refuses a graph break, which a loop over samples' data or .item() would cause."""
    layer = make_layer(seed=12, backend="reference")
    hidden, image_embeds, media_offset, mask = scenario_inputs("mixed", seed=13)
    inputs = (hidden.float(), *pack_images(image_embeds.float(), media_offset))
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(*inputs, attention_mask=mask), layer(*inputs, attention_mask=mask), rtol=0, atol=0)


def test_pack_images_lays_out_owl3s_inputs_per_sample():
    embeds = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    images, positions, counts = pack_images(embeds, [[5], [], [1, 7, 9]])
    assert images.shape == (3, 3, 2, 3) and positions.dtype == counts.dtype == torch.int32
    assert torch.equal(images[0, 0], embeds[0]) and torch.equal(images[2], embeds[1:])
    assert not images[0, 1:].any() and not images[1].any()
    assert positions.tolist() == [[5, 0, 0], [0, 0, 0], [1, 7, 9]] and counts.tolist() == [1, 0, 3]


def test_parameters_have_owl3s_names_and_shapes():
    shapes = {name: tuple(p.shape) for name, p in HyperAttention(HIDDEN, HEADS, KV_HEADS).state_dict().items()}
    kv = HIDDEN // HEADS * KV_HEADS
    assert shapes == {"q_proj.weight": (HIDDEN, HIDDEN), "q_proj.bias": (HIDDEN,), "k_proj.weight": (kv, HIDDEN),
                      "k_proj.bias": (kv,), "v_proj.weight": (kv, HIDDEN), "v_proj.bias": (kv,),
                      "o_proj.weight": (HIDDEN, HIDDEN), "v_kv_proj.weight": (2 * kv, HIDDEN), "v_kv_proj.bias": (2 * kv,)}


def test_inputs_are_not_modified():
    hidden, image_embeds, media_offset, mask = scenario_inputs("mixed", seed=10)
    inputs = (hidden, *pack_images(image_embeds, media_offset))
    before = [x.clone() for x in (*inputs, mask)]
    make_layer(seed=11).double()(*inputs, attention_mask=mask)
    assert all(torch.equal(x, y) for x, y in zip(before, (*inputs, mask)))


@pytest.mark.parametrize("change,error,match", [
    ({"hidden_states": torch.zeros(2, 6, 64)}, ValueError, r"hidden_states must be \[B, L >= 1, 128\], got \(2, 6, 64\)"),
    ({"hidden_states": torch.zeros(2, 6, 128, dtype=torch.int64)}, TypeError, "hidden_states must be a floating"),
    ({"images": torch.zeros(2, 3, 5, 64)}, ValueError, r"images must be a tensor \[B=2, M, Lv >= 1, 128\]"),
    ({"images": torch.zeros(2, 3, 5, 128, dtype=torch.float64)}, TypeError, "images .* must have hidden_states' dtype"),
    ({"image_positions": torch.zeros(2, 3)}, ValueError, r"image_positions must be an int32 or int64 tensor \[2, 3\] on cpu"),
    ({"image_positions": None}, ValueError, r"image_positions must be .* got NoneType"),
    ({"image_counts": torch.zeros(3, dtype=torch.int32)}, ValueError, r"image_counts must be an int32 or int64 tensor \[2\]"),
    ({"positions": torch.zeros(2, 5, dtype=torch.int32)}, ValueError, r"positions must be an int32 or int64 tensor \[2, 6\]"),
    ({"attention_mask": torch.ones(2, 6)}, ValueError, r"attention_mask must be a bool tensor \[2, 6\] on cpu"),
])
def test_bad_inputs_raise_naming_the_argument(change, error, match):
    arguments = {"hidden_states": torch.zeros(2, 6, HIDDEN), "images": torch.zeros(2, 3, 5, HIDDEN),
                 "image_positions": torch.zeros(2, 3, dtype=torch.int32), "image_counts": None, **change}
    with pytest.raises(error, match=match):
        HyperAttention(HIDDEN, HEADS, KV_HEADS, backend="reference")(**arguments)


def test_bad_construction_and_packing_raise():
    with pytest.raises(ValueError, match="num_heads 3 must divide hidden_size 128"):
        HyperAttention(HIDDEN, 3)
    with pytest.raises(ValueError, match="num_kv_heads 3 must divide num_heads"):
        HyperAttention(HIDDEN, HEADS, 3)
    with pytest.raises(ValueError, match=r"image_embeds must be a tensor \[N, Lv, C\] with N = 3"):
        pack_images(torch.zeros(2, 5, HIDDEN), [[1], [2, 3]])
