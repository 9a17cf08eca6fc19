"""Tiny Whisper (encoder-decoder, head dim 16 and 32) and Mllama (grouped K/V heads, cross-attention layers) on
mplug_kernels through register(): outputs and gradients within 2x of eager's low-precision error against eager
float64, greedy generate() tokens equal to eager's, causal self-attention on key/query positions and no
grouped-heads fallback (the fallback warnings are counted by reason). The causal description padding_mask attaches
is checked against the dense mask's own values."""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

from mplug_kernels.backends import BACKENDS  # noqa: E402
from mplug_kernels.integrations import transformers as hf  # noqa: E402
from test_transformers_integration import (  # noqa: E402,F401 (fresh_warnings, kernel_calls: fixtures)
    FEW_COMBOS, attn_name, check_2x, combo_id, fallback_messages, flat_grads, fresh_warnings, kernel_calls,
    skip_unless_backend_runs, with_attention,
)

IMAGE_TOKEN = 98
GENERATE = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)


def model_class(name: str):
    """transformers.<name>, or skip with the reason when this transformers lacks it."""
    cls = getattr(transformers, name, None)
    if cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return cls


def whisper_master():
    """Encoder 2 heads x 32, decoder 4 heads x 16; init_std 0.5 so that greedy tokens are not one token repeated."""
    config = model_class("WhisperConfig")(
        vocab_size=99, num_mel_bins=8, encoder_layers=2, decoder_layers=2, d_model=64, encoder_attention_heads=2,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        init_std=0.5)
    torch.manual_seed(0)
    return model_class("WhisperForConditionalGeneration")(config).eval().double()


def mllama_master():
    """Vision 2 heads x 16; text 4 query heads over 2 K/V heads x 16, layers self / cross / self."""
    vision = dict(hidden_size=32, num_hidden_layers=2, num_global_layers=1, attention_heads=2, intermediate_size=32,
                  vision_output_dim=64, image_size=16, patch_size=8, max_num_tiles=1, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1]])
    text = dict(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=64, cross_attention_layers=[1], max_position_embeddings=64, bos_token_id=1,
                eos_token_id=2, pad_token_id=0)
    config = model_class("MllamaConfig")(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    return model_class("MllamaForConditionalGeneration")(config).eval().double()


def mllama_inputs(generator, batch=2, length=7):
    """Text with the image token at 1 (every later token sees the image) and row 1 right-padded by 2."""
    ids = torch.randint(5, 90, (batch, length), generator=generator)
    ids[:, 1] = IMAGE_TOKEN
    text_mask = torch.ones(batch, length, dtype=torch.long)
    text_mask[1, length - 2:] = 0
    sees_image = torch.zeros(batch, length, 1, 1, dtype=torch.long)
    sees_image[:, 1:] = 1
    return dict(input_ids=ids, attention_mask=text_mask, cross_attention_mask=sees_image,
                pixel_values=torch.randn(batch, 1, 1, 3, 16, 16, generator=generator),
                aspect_ratio_ids=torch.ones(batch, 1, dtype=torch.long),
                aspect_ratio_mask=torch.ones(batch, 1, 1, dtype=torch.long))


def expected_fallbacks(backend, others=()):
    """The sorted fallback reasons: ``others``, and a causal prefix's on a backend without key/query positions."""
    if BACKENDS[backend].supports_positions:
        return list(others)
    return sorted([*others, f"causal attention over several queries on {backend} (it takes no key/query positions)"])


def trainable(model):
    """model's parameters that take gradients (Whisper's encoder positions do not)."""
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def reasons(messages):
    """The sorted reasons of fallback warning messages."""
    return sorted(message.removeprefix("mplug_kernels: ").split("; this call")[0] for message in messages)


@pytest.mark.parametrize("combo", FEW_COMBOS, ids=combo_id)
def test_whisper_matches_eager(combo, kernel_calls):
    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype, head_dim=16)
    master = whisper_master()
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 8, 32, generator=generator)
    decoder_ids = torch.randint(3, 99, (2, 6), generator=generator)
    decoder_mask = torch.ones(2, 6, dtype=torch.long)
    decoder_mask[1, 4:] = 0
    seed = torch.randn(2, 6, 99, generator=generator)

    def run(model, run_dtype):
        inputs = features.to(run_dtype).requires_grad_()
        logits = model(inputs, decoder_input_ids=decoder_ids, decoder_attention_mask=decoder_mask).logits
        return logits, flat_grads((logits.double() * seed).sum(), [inputs, *trainable(model)])

    fallbacks = check_2x("Whisper", run, master, dtype, attn_name(backend))
    assert reasons(fallbacks) == expected_fallbacks(backend)
    decoder_self = 2 if BACKENDS[backend].supports_positions else 0
    assert kernel_calls == [backend] * (2 + 2 + decoder_self)  # encoder self, decoder cross (and causal self)


@pytest.mark.parametrize("combo", FEW_COMBOS, ids=combo_id)
def test_mllama_matches_eager_without_grouped_fallback(combo, kernel_calls):
    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype, head_dim=16)
    master = mllama_master()
    generator = torch.Generator().manual_seed(2)
    inputs = mllama_inputs(generator)
    seed = torch.randn(2, 7, 99, generator=generator)

    def run(model, run_dtype):
        pixels = inputs["pixel_values"].to(run_dtype).requires_grad_()
        logits = model(**{**inputs, "pixel_values": pixels}).logits
        return logits, flat_grads((logits.double() * seed).sum(), [pixels, *model.parameters()])

    fallbacks = check_2x("Mllama", run, master, dtype, attn_name(backend))
    per_query = [reason for reason in reasons(fallbacks) if reason.startswith("a 4-D mask of shape")]
    assert len(per_query) == 1 and "may differ per query" in per_query[0]  # one warning: vision and cross prefix
    assert reasons(fallbacks) == expected_fallbacks(backend, per_query)  # no grouped-heads fallback
    self_layers = 2 if BACKENDS[backend].supports_positions else 0
    assert kernel_calls == [backend] * self_layers  # vision (per-query padding) and the cross prefill fall back


def test_whisper_generate_identical_tokens(kernel_calls):
    master = whisper_master().float()
    features = torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(3))
    eager, ours = (with_attention(master, torch.float32, name) for name in ("eager", attn_name("reference")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = ours.generate(features, **GENERATE)
    torch.testing.assert_close(tokens, eager.generate(features, **GENERATE), atol=0, rtol=0)
    assert fallback_messages(caught) == []
    assert len(kernel_calls) == 2 + 6 * 2 * 2  # encoder, 6 steps x 2 layers x (self, cross)


def test_mllama_generate_identical_tokens(kernel_calls):
    master = mllama_master().float()
    inputs = mllama_inputs(torch.Generator().manual_seed(4))
    eager, ours = (with_attention(master, torch.float32, name) for name in ("eager", attn_name("reference")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokens = ours.generate(**inputs, **GENERATE)
    torch.testing.assert_close(tokens, eager.generate(**inputs, **GENERATE), atol=0, rtol=0)
    assert not any("grouped" in message for message in fallback_messages(caught))
    assert len(kernel_calls) == 2 + 5 * 3  # the prefix's 2 causal self layers, 5 decode steps x 3 layers


@pytest.mark.parametrize("q_length,kv_length,kv_offset,q_offset", [(5, 5, 0, 0), (3, 9, 0, 6), (1, 9, 0, 8),
                                                                    (4, 6, 3, 5)])
def test_causal_description_is_the_masks_visibility(q_length, kv_length, kv_offset, q_offset):
    from transformers.masking_utils import causal_mask_function

    padding = torch.ones(2, kv_offset + kv_length, dtype=torch.bool)
    padding[0, :2] = False  # left padding
    padding[1, -1] = False
    mask = hf.padding_mask(batch_size=2, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                           kv_offset=kv_offset, mask_function=causal_mask_function, attention_mask=padding)
    key_positions, query_positions, keep = getattr(mask, hf.CAUSAL_ATTRIBUTE)
    assert key_positions.dtype == query_positions.dtype == torch.int32
    visible = keep[:, None, :] & (key_positions[:, None, :] <= query_positions[:, :, None])
    assert torch.equal(visible, mask[:, 0])


def test_causal_description_only_for_the_plain_causal_function():
    from transformers.masking_utils import and_masks, causal_mask_function

    shared = dict(batch_size=1, q_length=3, kv_length=3, attention_mask=None)
    overlaid = and_masks(causal_mask_function, lambda b, h, q, kv: kv > 0)
    assert not hasattr(hf.padding_mask(**shared, mask_function=overlaid), hf.CAUSAL_ATTRIBUTE)
    assert hasattr(hf.padding_mask(**shared, mask_function=causal_mask_function), hf.CAUSAL_ATTRIBUTE)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("backend", ["reference", "sdpa", "triton"])
def test_is_causal_without_mask_matches_sdpa_or_names_its_reason(backend, kernel_calls):
    generator = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(2, heads, 5, 16, generator=generator) for heads in (4, 2, 2))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, _ = hf.attention_forward(backend, _Module(), query, key, value, None, scaling=0.25)
    want = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, scale=0.25,
                                                            enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    assert reasons(fallback_messages(caught)) == expected_fallbacks(backend)
    assert kernel_calls == ([backend] if BACKENDS[backend].supports_positions else [])


def test_causal_decoder_compiles_fullgraph_on_positions(kernel_calls):
    """With a decoder mask given: without one, transformers under tracing adds its packed-sequence mask function
    (it cannot check the positions without a host sync), which we do not recognise, so that call falls back."""
    torch._dynamo.reset()
    master = whisper_master().float()
    eager, ours = (with_attention(master, torch.float32, name) for name in ("eager", attn_name("reference")))
    generator = torch.Generator().manual_seed(6)
    features = torch.randn(2, 8, 32, generator=generator)
    decoder_ids = torch.randint(3, 99, (2, 6), generator=generator)
    inputs = dict(decoder_input_ids=decoder_ids, decoder_attention_mask=torch.ones(2, 6, dtype=torch.long),
                  use_cache=False)
    got = torch.compile(ours, fullgraph=True, backend="aot_eager")(features, **inputs).logits
    torch.testing.assert_close(got, eager(features, **inputs).logits, atol=1e-4, rtol=1e-4)
    assert len(kernel_calls) == 2 + 2 * 2  # traced: encoder self, decoder causal self and cross, all on our kernels
