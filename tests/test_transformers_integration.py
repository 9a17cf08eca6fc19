"""mplug_kernels inside Hugging Face transformers models (tiny random configs, no downloads): outputs and gradients
within 2x of transformers' own eager attention's low-precision error against its float64 answer, padded batches,
identical generate() tokens, torch.compile, and the fallbacks (transformers' own answer, one warning per reason)."""
from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
import transformers.masking_utils  # noqa: E402

from transformers import (  # noqa: E402
    BertConfig, BertLMHeadModel, BertModel, BlipConfig, BlipForConditionalGeneration, BlipForQuestionAnswering,
    CLIPVisionConfig, CLIPVisionModel, DynamicCache, EncoderDecoderCache, ViTConfig, ViTModel,
)

from mplug_kernels.backends import BACKENDS  # noqa: E402
from mplug_kernels.integrations import transformers as hf  # noqa: E402
from attention_testing import assert_within_budget, skip_unless_supported  # noqa: E402

# (backend, dtype): the Triton interpreter takes float32/float16, the cuda backend (CPU emulator) float16/bfloat16.
COMBOS = [
    ("reference", torch.float32), ("triton", torch.float32), ("triton", torch.float16),
    ("cuda", torch.float16), ("cuda", torch.bfloat16),
]
FEW_COMBOS = [("reference", torch.float32), ("triton", torch.float16), ("cuda", torch.bfloat16)]
HIDDEN, HEADS = 64, 2  # head dim 32: every backend takes it
TINY = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
TEXT_IDS = dict(vocab_size=99, bos_token_id=1, eos_token_id=2, pad_token_id=0)
# Later 5.x releases build bidirectional masks for a decoder config with is_causal=False (ALBEF/mPLUG text encoders).
DECODER_CAN_BE_BIDIRECTIONAL = 'config, "is_causal"' in inspect.getsource(
    transformers.masking_utils.create_causal_mask)


def combo_id(combo):
    return f"{combo[0]}-{str(combo[1]).replace('torch.', '')}"


@pytest.fixture(autouse=True)
def fresh_warnings():
    """Each test sees the once-per-reason fallback warnings anew."""
    hf._warned_reasons.clear()
    yield
    hf._warned_reasons.clear()


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls that reach mplug_kernels.co_attention through the integration."""
    calls, original = [], hf.co_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf, "co_attention", counting)
    return calls


def skip_unless_backend_runs(backend, dtype, head_dim=HIDDEN // HEADS):
    x = torch.randn(1, 2, 1, head_dim).to(dtype)
    skip_unless_supported(backend, x, [x], [x], [None], return_lse=False)


def attn_name(backend):
    return hf.register(f"mplug_kernels_{backend}", backend=backend)


def with_attention(master, dtype, attn_implementation):
    """A copy of master (own config) in dtype using attn_implementation."""
    model = copy.deepcopy(master).to(dtype)
    model.set_attn_implementation(attn_implementation)
    return model


def flat_grads(loss, tensors):
    grads = torch.autograd.grad(loss, tensors, allow_unused=True, materialize_grads=True)
    return torch.cat([g.double().flatten() for g in grads])


def fallback_messages(caught):
    return [str(w.message) for w in caught if issubclass(w.category, hf.FallbackWarning)]


def check_2x(name, run, master, dtype, attn, ours_model=None):
    """run(model, dtype) -> (output, flat grads); ours within 2x of eager-in-dtype's error against eager float64."""
    ref_out, ref_grads = run(with_attention(master, torch.float64, "eager"), torch.float64)
    base_out, base_grads = run(with_attention(master, dtype, "eager"), dtype)
    ours = ours_model if ours_model is not None else with_attention(master, dtype, attn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, grads = run(ours, dtype)
    assert_within_budget(f"{name} output", out, ref_out, base_out, 2.0)
    assert_within_budget(f"{name} grads", grads, ref_grads, base_grads, 2.0)
    return fallback_messages(caught)


def padded_text(generator, batch=2, length=6):
    ids = torch.randint(5, 99, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 2:] = 0
    return ids, mask


def vision_states(generator, batch=2, length=20):
    states = torch.randn(batch, length, HIDDEN, generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, 13:] = 0
    return states, mask


def bert_fusion_master():
    """ALBEF/mPLUG-style text encoder: bidirectional self-attention + cross-attention to vision in every layer."""
    torch.manual_seed(0)
    config = BertConfig(**TINY, **TEXT_IDS, is_decoder=True, add_cross_attention=True, is_causal=False)
    return BertModel(config, add_pooling_layer=False).eval().double()


@pytest.mark.parametrize("combo", COMBOS, ids=combo_id)
def test_bert_cross_attention_matches_eager(combo, kernel_calls):
    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype)
    generator = torch.Generator().manual_seed(1)
    ids, text_mask = padded_text(generator)
    vision, vision_mask = vision_states(generator)
    seed = torch.randn(2, 6, HIDDEN, generator=generator)

    def run(model, run_dtype):
        states = vision.to(run_dtype).requires_grad_()
        out = model(ids, attention_mask=text_mask, encoder_hidden_states=states, encoder_attention_mask=vision_mask,
                    use_cache=False).last_hidden_state
        return out, flat_grads((out.double() * seed).sum(), [states, *model.parameters()])

    fallbacks = check_2x("BertModel", run, bert_fusion_master(), dtype, attn_name(backend))
    if DECODER_CAN_BE_BIDIRECTIONAL:
        assert fallbacks == []
        assert kernel_calls == [backend] * 4  # 2 layers x (self + cross), all on our kernels
    else:  # this transformers ignores config.is_causal: the self-attention is causal and falls back
        assert len(fallbacks) == 1 and "causal" in fallbacks[0]
        assert kernel_calls == [backend] * 2


def test_bert_lm_head_causal_through_positions_and_generate(kernel_calls):
    backend, dtype = "reference", torch.float32
    torch.manual_seed(0)
    config = BertConfig(**TINY, **TEXT_IDS, is_decoder=True, add_cross_attention=True)
    eager = BertLMHeadModel(config).eval()
    eager.set_attn_implementation("eager")
    ours = with_attention(eager, dtype, attn_name(backend))
    generator = torch.Generator().manual_seed(2)
    ids, text_mask = padded_text(generator)
    vision, vision_mask = vision_states(generator)
    inputs = dict(attention_mask=text_mask, encoder_hidden_states=vision, encoder_attention_mask=vision_mask)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        logits = [ours(ids, **inputs, use_cache=False).logits for _ in range(2)]
    torch.testing.assert_close(logits[0], eager(ids, **inputs, use_cache=False).logits, atol=2e-5, rtol=1e-4)
    assert fallback_messages(caught) == []  # the padded causal self-attention runs on key/query positions
    assert len(kernel_calls) == 2 * 2 * 2  # 2 calls x 2 layers x (causal self + cross)

    def generate(model):
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        return model.generate(ids, **inputs, max_new_tokens=5, do_sample=False, past_key_values=cache)

    kernel_calls.clear()
    torch.testing.assert_close(generate(ours), generate(eager), atol=0, rtol=0)
    assert len(kernel_calls) > 2 * 4  # every decode step's self- and cross-attention ran on our kernels


@pytest.mark.parametrize("combo", FEW_COMBOS, ids=combo_id)
@pytest.mark.parametrize("model_cls,config_cls", [(CLIPVisionModel, CLIPVisionConfig), (ViTModel, ViTConfig)],
                         ids=["clip", "vit"])
def test_vision_encoder_matches_eager(model_cls, config_cls, combo, kernel_calls):
    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype)
    torch.manual_seed(0)
    config = config_cls(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
                        image_size=32, patch_size=8)
    master = model_cls(config).eval().double()
    generator = torch.Generator().manual_seed(3)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    seed = torch.randn(2, 17, HIDDEN, generator=generator)

    def run(model, run_dtype):
        out = model(pixel_values=pixels.to(run_dtype)).last_hidden_state
        return out, flat_grads((out.double() * seed).sum(), list(model.parameters()))

    assert check_2x(model_cls.__name__, run, master, dtype, attn_name(backend)) == []
    assert kernel_calls == [backend] * 2


def blip_config():
    text = dict(**TEXT_IDS, sep_token_id=2, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    vision = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64,
                  image_size=32, patch_size=8)
    return BlipConfig(text_config=text, vision_config=vision)


def patched_blip(master, dtype, backend):
    return hf.apply_mplug_kernels_to_blip(copy.deepcopy(master).to(dtype), backend=backend)


@pytest.mark.parametrize("combo", [("reference", torch.float32), ("cuda", torch.float16)], ids=combo_id)
def test_blip_vqa_patch_matches_eager(combo, kernel_calls):
    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype)
    torch.manual_seed(0)
    master = BlipForQuestionAnswering(blip_config()).eval().double()
    generator = torch.Generator().manual_seed(4)
    ids, text_mask = padded_text(generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    labels = torch.randint(5, 99, (2, 4), generator=generator)

    def run(model, run_dtype):
        loss = model(input_ids=ids, pixel_values=pixels.to(run_dtype), attention_mask=text_mask, labels=labels).loss
        return loss, flat_grads(loss.double(), list(model.parameters()))

    fallbacks = check_2x("BlipForQuestionAnswering", run, master, dtype, None,
                         ours_model=patched_blip(master, dtype, backend))
    assert len(fallbacks) == 1 and "causal" in fallbacks[0]  # the answer decoder's causal self-attention
    assert len(kernel_calls) == 2 * 2 + 2  # encoder self + cross, decoder cross, in 2 layers each


def count_cross_kv_projections(model):
    """A list that grows by one for every cross-attention K projection in model's text decoder."""
    calls = []
    for layer in model.text_decoder.bert.encoder.layer:
        layer.crossattention.self.key.register_forward_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("use_cache", [True, False])
def test_blip_vqa_generate_identical_tokens_and_cross_kv_once(use_cache, kernel_calls):
    torch.manual_seed(0)
    eager = BlipForQuestionAnswering(blip_config()).eval()
    ours = patched_blip(eager, torch.float32, "reference")
    generator = torch.Generator().manual_seed(5)
    ids, text_mask = padded_text(generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    eager_projections, our_projections = count_cross_kv_projections(eager), count_cross_kv_projections(ours)

    def generate(model):
        return model.generate(input_ids=ids, pixel_values=pixels, attention_mask=text_mask, max_new_tokens=6,
                              min_new_tokens=6, num_beams=2, use_cache=use_cache)

    tokens = generate(ours)
    torch.testing.assert_close(tokens, generate(eager), atol=0, rtol=0)
    assert len(our_projections) == 2  # once per layer per generate call
    assert len(eager_projections) == (2 if use_cache else 2 * 6)
    assert kernel_calls


def test_blip_captioning_generate_identical_tokens():
    torch.manual_seed(0)
    eager = BlipForConditionalGeneration(blip_config()).eval()
    ours = patched_blip(eager, torch.float32, "reference")
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    tokens = ours.generate(pixel_values=pixels, max_new_tokens=5, min_new_tokens=5)
    torch.testing.assert_close(tokens, eager.generate(pixel_values=pixels, max_new_tokens=5, min_new_tokens=5),
                               atol=0, rtol=0)


def test_torch_compile_of_registered_and_patched_models():
    torch._dynamo.reset()
    generator = torch.Generator().manual_seed(7)
    ids, text_mask = padded_text(generator)
    vision, vision_mask = vision_states(generator)
    master = bert_fusion_master().float()
    eager, ours = with_attention(master, torch.float32, "eager"), with_attention(master, torch.float32,
                                                                                   attn_name("reference"))
    inputs = dict(attention_mask=text_mask, encoder_hidden_states=vision, encoder_attention_mask=vision_mask,
                  use_cache=False)
    compiled = torch.compile(ours, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, **inputs).last_hidden_state, eager(ids, **inputs).last_hidden_state,
                               atol=2e-5, rtol=1e-4)

    torch.manual_seed(0)
    blip = BlipForQuestionAnswering(blip_config()).eval()
    text_encoder = patched_blip(blip, torch.float32, "reference").text_encoder
    compiled_text_encoder = torch.compile(text_encoder, backend="aot_eager")
    image = torch.randn(2, 17, HIDDEN, generator=generator)
    args = dict(input_ids=ids, attention_mask=text_mask, encoder_hidden_states=image)
    out = compiled_text_encoder(**args).last_hidden_state
    out.sum().backward()
    torch.testing.assert_close(out, blip.text_encoder(**args).last_hidden_state, atol=2e-5, rtol=1e-4)


def test_fallback_dropout_in_training_is_sdpa_and_warns_once(kernel_calls):
    torch.manual_seed(0)
    config = BertConfig(**{**TINY, "attention_probs_dropout_prob": 0.5}, **TEXT_IDS)
    sdpa = BertModel(config).train()
    sdpa.set_attn_implementation("sdpa")
    ours = with_attention(sdpa, torch.float32, attn_name("reference"))
    ids, text_mask = padded_text(torch.Generator().manual_seed(8))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            torch.manual_seed(9)
            out = ours(ids, attention_mask=text_mask).last_hidden_state
            torch.manual_seed(9)
            torch.testing.assert_close(out, sdpa(ids, attention_mask=text_mask).last_hidden_state, atol=0, rtol=0)
    assert fallback_messages(caught) == [
        "mplug_kernels: attention dropout > 0 in training; this call runs on transformers' own attention"]
    assert kernel_calls == []
    ours.eval()
    ours(ids, attention_mask=text_mask)
    assert kernel_calls == ["reference"] * 2


def test_fallback_output_attentions_gives_eager_weights(kernel_calls):
    master = bert_fusion_master().float()
    eager, ours = with_attention(master, torch.float32, "eager"), with_attention(master, torch.float32,
                                                                                   attn_name("reference"))
    generator = torch.Generator().manual_seed(10)
    ids, text_mask = padded_text(generator)
    vision, vision_mask = vision_states(generator)
    inputs = dict(attention_mask=text_mask, encoder_hidden_states=vision, encoder_attention_mask=vision_mask,
                  use_cache=False, output_attentions=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours(ids, **inputs)
    want = eager(ids, **inputs)
    for name in ("attentions", "cross_attentions"):
        assert len(got[name]) == 2
        for ours_weights, eager_weights in zip(got[name], want[name]):
            torch.testing.assert_close(ours_weights, eager_weights)
    assert len(fallback_messages(caught)) == 1 and kernel_calls == []


@pytest.mark.parametrize("case", ["per_query_mask", "head_dim_12"])
def test_fallback_gives_transformers_answer(case, kernel_calls):
    torch.manual_seed(0)
    hidden, heads = (36, 3) if case == "head_dim_12" else (HIDDEN, HEADS)
    config = BertConfig(**{**TINY, "hidden_size": hidden, "num_attention_heads": heads}, **TEXT_IDS)
    eager = BertModel(config).eval()
    eager.set_attn_implementation("eager")
    ours = with_attention(eager, torch.float32, attn_name("reference"))
    ids, text_mask = padded_text(torch.Generator().manual_seed(11))
    mask = text_mask
    if case == "per_query_mask":  # a user's own 4-D mask: query i sees keys 0..i+1
        allowed = torch.ones(6, 6, dtype=torch.bool).tril(1)[None, None].expand(2, 1, 6, 6)
        mask = torch.zeros(2, 1, 6, 6).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [ours(ids, attention_mask=mask).last_hidden_state for _ in range(2)]
    torch.testing.assert_close(got[0], eager(ids, attention_mask=mask).last_hidden_state, atol=2e-5, rtol=1e-4)
    assert len(fallback_messages(caught)) == 1 and kernel_calls == []


@pytest.mark.parametrize("combo", FEW_COMBOS, ids=combo_id)
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_llama_grouped_heads_decode_matches_eager(combo, kv_heads, kernel_calls):
    """A tiny Llama with 4 query heads and 1 (MQA) or 2 (GQA) K/V heads: the one-query decode step runs on our
    kernels without repeating K/V (the causal prefix too where the backend takes key/query positions, else it falls
    back), logits within 2x of eager's error."""
    from transformers import LlamaConfig, LlamaForCausalLM

    backend, dtype = combo
    skip_unless_backend_runs(backend, dtype, head_dim=32)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=32,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    master = LlamaForCausalLM(config).eval().double()
    ids = torch.randint(5, 99, (2, 7), generator=torch.Generator().manual_seed(3))

    def decode_logits(model):
        with torch.no_grad():
            cache = model(ids[:, :-1], use_cache=True).past_key_values
            return model(ids[:, -1:], past_key_values=cache).logits

    ref = decode_logits(with_attention(master, torch.float64, "eager"))
    base = decode_logits(with_attention(master, dtype, "eager"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = decode_logits(with_attention(master, dtype, attn_name(backend)))
    prefix_calls = 2 if BACKENDS[backend].supports_positions else 0
    assert kernel_calls == [backend] * (2 + prefix_calls)  # the decode step (and the prefix) of both layers
    assert not any("grouped" in message for message in fallback_messages(caught))
    assert_within_budget("decode logits", ours, ref, base, 2.0)


def test_key_padding_mask_conversion():
    keep = torch.tensor([[True, True, False], [True, False, False]])
    additive = torch.zeros(2, 1, 1, 3).masked_fill(~keep[:, None, None, :], torch.finfo(torch.float32).min)
    for mask in (keep[:, None, None, :], additive, additive.expand(2, 4, 5, 3)):
        converted, reason = hf.key_padding_mask(mask, 2)
        assert reason is None and torch.equal(converted, keep)
    broadcast, _ = hf.key_padding_mask(keep[:1, None, None, :], 2)
    assert torch.equal(broadcast, keep[:1].expand(2, 3))
    assert hf.key_padding_mask(torch.ones(2, 1, 4, 3, dtype=torch.bool), 2)[1] is not None
    assert hf.key_padding_mask(additive - 0.5, 2)[1] is not None  # a bias, not padding
    assert hf.key_padding_mask(keep, 2)[1] is not None  # 2-D


def test_register_validates_its_arguments():
    with pytest.raises(ValueError, match="name"):
        hf.register("sdpa")
    with pytest.raises(ValueError, match="backend"):
        hf.register("mplug_kernels_bad", backend="no_such_backend")
    with pytest.raises(ValueError, match="BlipTextSelfAttention"):
        hf.apply_mplug_kernels_to_blip(bert_fusion_master(), backend="reference")


def test_package_imports_without_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "import mplug_kernels.integrations.transformers as hf\n"
        "try:\n    hf.register()\nexcept ImportError as error:\n    print('ImportError:', error)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ImportError: mplug_kernels.integrations.transformers needs transformers" in result.stdout


def test_patched_blip_copies_pickles_and_shares_its_config(tmp_path, kernel_calls):
    torch.manual_seed(0)
    model = patched_blip(BlipForQuestionAnswering(blip_config()).eval(), torch.float32, "reference")
    assert model.text_encoder.config is model.config.text_config
    assert model.text_decoder.config is model.config.text_config
    generator = torch.Generator().manual_seed(12)
    ids, text_mask = padded_text(generator)
    pixels = torch.randn(2, 3, 32, 32, generator=generator)
    inputs = dict(input_ids=ids, pixel_values=pixels, attention_mask=text_mask, max_new_tokens=4, min_new_tokens=4)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.text_decoder.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator))
    eager = BlipForQuestionAnswering(blip_config()).eval()
    eager.load_state_dict(copied.state_dict())
    torch.testing.assert_close(copied.generate(**inputs), eager.generate(**inputs), atol=0, rtol=0)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    calls_before = len(kernel_calls)
    torch.testing.assert_close(loaded.generate(**inputs), model.generate(**inputs), atol=0, rtol=0)
    assert len(kernel_calls) > calls_before


def test_patched_blip_output_attentions_falls_back_with_weights(kernel_calls):
    torch.manual_seed(0)
    eager = BlipForQuestionAnswering(blip_config()).eval()
    ours = patched_blip(eager, torch.float32, "reference")
    generator = torch.Generator().manual_seed(13)
    ids, text_mask = padded_text(generator)
    image = torch.randn(2, 17, HIDDEN, generator=generator)
    args = dict(input_ids=ids, attention_mask=text_mask, encoder_hidden_states=image, output_attentions=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = ours.text_encoder(**args)
    want = eager.text_encoder(**args)
    assert got.attentions is not None and len(got.attentions) == len(want.attentions) == 2
    for ours_weights, eager_weights in zip(got.attentions, want.attentions):
        torch.testing.assert_close(ours_weights, eager_weights, atol=1e-6, rtol=1e-5)
    assert fallback_messages(caught) == [
        "mplug_kernels: output_attentions (attention weights are requested); this call runs on transformers' own "
        "attention"]
    assert kernel_calls == []


def test_materialised_4d_mask_reason_names_its_shape():
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    _, reason = hf.key_padding_mask(mask, 2)
    assert "4-D mask of shape (2, 1, 4, 4)" in reason and "causal or per-query" not in reason
