"""The whole mplug model: structure, backends agree (forward and gradients), the decoder cache, no [v; t]
concatenation, gradient checkpointing, bad input, and base/large building and running on the CPU."""
from __future__ import annotations

import pytest
import torch
from torch.overrides import TorchFunctionMode

from mplug import MPLUG, DecoderCache, MPLUGConfig
from mplug_kernels.backends import BACKENDS, AttentionCall

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def skip_unless_usable(backend: str, dtype: torch.dtype = torch.float32, head_dim: int = 16) -> None:
    reasons = BACKENDS[backend].reasons(AttentionCall(DEVICE.type, dtype, head_dim, 2, True, True, False))
    if reasons:
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")


def tiny_model(seed: int = 0, **changes) -> MPLUG:
    torch.manual_seed(seed)
    return MPLUG(MPLUGConfig.tiny(**changes)).to(DEVICE)


def inputs(config: MPLUGConfig, batch: int = 2, text_len: int = 7, answer_len: int = 5, seed: int = 0):
    """images, text ids/mask (row 1 padded), answer ids: fresh random values."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, config.image_size, config.image_size, generator=generator).to(DEVICE)
    text_ids = torch.randint(0, config.vocab_size, (batch, text_len), generator=generator).to(DEVICE)
    text_mask = torch.ones(batch, text_len, dtype=torch.bool, device=DEVICE)
    text_mask[1:, text_len - 2:] = False
    answer_ids = torch.randint(0, config.vocab_size, (batch, answer_len), generator=generator).to(DEVICE)
    return images, text_ids, text_mask, answer_ids


def run(model: MPLUG, images, text_ids, text_mask, answer_ids):
    """The public submodule calls chained: (image_out, text_out, logits)."""
    image_embeds = model.visual_encoder(images)
    image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.bool, device=images.device)
    text_embeds = model.text_encoder(text_ids, text_mask)
    image_out, text_out = model.fusion_encoder(image_embeds, image_mask, text_embeds, text_mask)
    answer_mask = torch.ones_like(answer_ids, dtype=torch.bool)
    logits = model.text_decoder(answer_ids, answer_mask, memory=(image_out, text_out), memory_masks=(image_mask, text_mask))
    return image_out, text_out, logits


def outputs_and_grads(model: MPLUG, batch):
    model.zero_grad()
    outputs = run(model, *batch)
    generator = torch.Generator().manual_seed(5)
    loss = sum((out * torch.randn(out.shape, generator=generator).to(DEVICE)).sum() for out in outputs)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return [out.detach() for out in outputs], grads


def test_structure_official_names_and_tied_heads():
    config = MPLUGConfig.tiny()
    model = MPLUG(config)
    assert model.config is not config and model.config == config
    assert model.vision_proj.weight.shape == (config.embed_dim, config.hidden_size)
    assert model.text_proj.weight.shape == (config.embed_dim, config.hidden_size)
    assert model.itm_head.weight.shape == (2, config.hidden_size)
    assert model.image_queue.shape == model.text_queue.shape == (config.embed_dim, config.queue_size)
    torch.testing.assert_close(model.image_queue.norm(dim=0), torch.ones(config.queue_size))
    assert model.temp.item() == pytest.approx(0.07)
    assert model.text_decoder.cls.predictions.decoder.weight is model.text_decoder.bert.embeddings.word_embeddings.weight
    assert model.mlm_head.decoder.weight is model.text_encoder.embeddings.word_embeddings.weight
    keys = set(model.state_dict())
    for key in (
        "visual_encoder.visual.transformer.resblocks.1.attn.in_proj_weight",
        "visual_encoder.visn_fc.weight",
        "text_encoder.encoder.layer.1.attention.self.query.weight",
        "fusion_encoder.encoder.layer.1.crossattention.self.key.weight",
        "fusion_encoder.encoder.layer.2.attention.output.LayerNorm.weight",
        "text_decoder.bert.encoder.layer.1.crossattention.self.value.bias",
        "text_decoder.cls.predictions.transform.dense.weight",
        "mlm_head.bias",
    ):
        assert key in keys, key
    assert not any(key.startswith("fusion_encoder.encoder.layer.2.crossattention") for key in keys)


@pytest.mark.parametrize("fusion", ["skip", "connected", "two_way"])
def test_public_calls_give_documented_shapes(fusion):
    model = tiny_model(fusion=fusion).eval()
    config = model.config
    image_out, text_out, logits = run(model, *inputs(config))
    assert image_out.shape == (2, config.num_visual_tokens, config.hidden_size)
    assert text_out.shape == (2, 7, config.hidden_size)
    assert logits.shape == (2, 5, config.vocab_size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "backend, fusion",
    [("sdpa", "skip"), ("sdpa", "connected"), ("sdpa", "two_way"), ("triton", "skip"), ("cuda", "skip")],
)
def test_every_backend_gives_the_reference_outputs_and_grads(backend, fusion):
    skip_unless_usable(backend)
    model = tiny_model(fusion=fusion, attn_backend="reference")
    batch = inputs(model.config, batch=2 if backend == "sdpa" else 1)
    expected_outputs, expected_grads = outputs_and_grads(model, batch)
    outputs, grads = outputs_and_grads(model.set_attn_backend(backend), batch)
    for name, out, expected in zip(("image_out", "text_out", "logits"), outputs, expected_outputs):
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4, msg=lambda m: f"{name}: {m}")
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():
        # A bias is measured on its weight's gradient scale: key biases have an exact gradient of 0 (softmax
        # ignores them), so theirs is pure rounding noise of the weight-sized terms that cancel.
        sibling = expected_grads.get(name.replace(".bias", ".weight"), expected_grads[name])
        scale = max(expected_grads[name].abs().max().item(), sibling.abs().max().item())
        torch.testing.assert_close(grad, expected_grads[name], atol=2e-4 * scale, rtol=1e-3, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_low_precision_model_on_our_kernels_within_twice_sdpa_error(backend):
    """The whole model in float16 (bfloat16 on a GPU), head dim 32: its error against the float32 model
    is at most twice that of the same model on PyTorch SDPA in the same dtype (flash-attn's rule)."""
    dtype = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
    skip_unless_usable(backend, dtype, head_dim=32)
    model = tiny_model(vision_width=96, vision_heads=3, hidden_size=128, num_heads=4, intermediate_size=256,
                       attn_backend="reference")
    images, text_ids, text_mask, answer_ids = inputs(model.config)
    with torch.no_grad():
        expected = run(model, images, text_ids, text_mask, answer_ids)
        low = model.to(dtype)
        ours = run(low.set_attn_backend(backend), images.to(dtype), text_ids, text_mask, answer_ids)
        baseline = run(low.set_attn_backend("sdpa"), images.to(dtype), text_ids, text_mask, answer_ids)
    for name, out, base, ref in zip(("image_out", "text_out", "logits"), ours, baseline, expected):
        assert torch.isfinite(out).all(), name
        # the max error is dominated by float16 rounding outside attention; the mean error sees attention too
        for statistic in (torch.max, torch.mean):
            error, base_error = statistic((out.float() - ref).abs()).item(), statistic((base.float() - ref).abs()).item()
            assert error <= 2 * base_error, f"{name}: {statistic.__name__} error {error:.3e} vs sdpa {base_error:.3e}"


def test_set_attn_backend_reaches_every_attention_layer():
    model = tiny_model(fusion="two_way")
    attention_modules = [m for m in model.modules() if hasattr(m, "backend")]
    assert len(attention_modules) >= 2 * 2 + 2 + 2 * 4 + 2 * 2  # ViT, text, fusion (both ways), decoder
    model.set_attn_backend("reference")
    assert model.config.attn_backend == "reference"
    assert all(m.backend == "reference" for m in attention_modules)
    with pytest.raises(ValueError, match="attn_backend must be 'auto' or one of"):
        model.set_attn_backend("fastest")


@pytest.mark.parametrize("memory_kind", ["vision_and_text", "vision_only"])
def test_cached_decoding_matches_the_full_prefix(memory_kind):
    model = tiny_model().eval()
    config = model.config
    generator = torch.Generator().manual_seed(3)
    memory = [torch.randn(2, 17, 64, generator=generator).to(DEVICE), torch.randn(2, 7, 64, generator=generator).to(DEVICE)]
    masks = [torch.ones(2, 17, dtype=torch.bool, device=DEVICE), torch.tensor([[1] * 7, [1] * 4 + [0] * 3], dtype=torch.bool, device=DEVICE)]
    if memory_kind == "vision_only":
        memory, masks = memory[:1], masks[:1]
    ids = torch.randint(0, config.vocab_size, (2, 6), generator=generator).to(DEVICE)
    mask = torch.ones(2, 6, dtype=torch.bool, device=DEVICE)
    mask[1, 3] = False
    with torch.no_grad():
        full = model.text_decoder(ids, mask, memory=tuple(memory), memory_masks=tuple(masks))
        steps, cache = model.text_decoder(ids[:, :2], mask[:, :2], memory=tuple(memory), memory_masks=tuple(masks), use_cache=True)
        steps = [steps]
        for i in range(2, 6):
            logits, cache = model.text_decoder(ids[:, i:i + 1], mask[:, i:i + 1], cache=cache, use_cache=True)
            steps.append(logits)
    assert isinstance(cache, DecoderCache) and cache.length == 6
    # float32, other summation order (one step vs the whole prefix): 1.2e-5 measured on this CPU at atol 1e-5
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=5e-5, rtol=1e-4)


def test_cache_reorder_follows_beams():
    """Expanding a per-image cache to beams, then reordering, equals decoding the reordered rows from scratch."""
    model = tiny_model().eval()
    generator = torch.Generator().manual_seed(4)
    memory = (torch.randn(2, 17, 64, generator=generator).to(DEVICE), torch.randn(2, 7, 64, generator=generator).to(DEVICE))
    ids = torch.randint(0, model.config.vocab_size, (6, 4), generator=generator).to(DEVICE)
    expand = torch.arange(2, device=DEVICE).repeat_interleave(3)
    parents = torch.tensor([2, 2, 0, 4, 3, 3], device=DEVICE)
    with torch.no_grad():
        cache = model.text_decoder.memory_cache(memory).reorder(expand)
        _, cache = model.text_decoder(ids[:, :3], None, cache=cache, use_cache=True)
        cache.reorder(parents, memory=False)
        last, cache = model.text_decoder(ids[:, 3:], None, cache=cache, use_cache=True)
        prefix = torch.cat([ids[parents, :3], ids[:, 3:]], dim=1)
        beam_memory = tuple(m[expand] for m in memory)
        full = model.text_decoder(prefix, None, memory=beam_memory, memory_masks=None)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_gives_the_same_grads():
    model = tiny_model(attn_backend="sdpa").train()
    batch = inputs(model.config)
    _, expected = outputs_and_grads(model, batch)
    _, grads = outputs_and_grads(model.set_gradient_checkpointing(True), batch)
    assert model.visual_encoder.visual.transformer.gradient_checkpointing and model.fusion_encoder.gradient_checkpointing
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], atol=1e-6, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


class CatRecorder(TorchFunctionMode):
    """Records the lengths along dim 1 of every torch.cat over 3-D or 4-D tensors."""

    def __init__(self):
        super().__init__()
        self.joined = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.cat, torch.concat, torch.concatenate):
            tensors = args[0] if args else kwargs["tensors"]
            dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
            if tensors and tensors[0].dim() >= 3 and dim in (1, -3 if tensors[0].dim() == 3 else -4):
                self.joined.append(sorted(t.shape[1] for t in tensors))
        return func(*args, **kwargs)


@pytest.mark.parametrize("fusion", ["skip", "connected"])
def test_vision_and_text_are_never_concatenated(fusion):
    """On the fused (triton) path no torch.cat joins Lv = 17 visual and Lt = 7 text tokens."""
    skip_unless_usable("triton")
    model = tiny_model(fusion=fusion, attn_backend="triton").eval()
    batch = inputs(model.config, batch=1)
    recorder = CatRecorder()
    with torch.no_grad(), recorder:
        run(model, *batch)
    assert recorder.joined, "the recorder saw no torch.cat at all (the ViT class token uses one)"
    assert [17, 7] not in [sorted(j, reverse=True) for j in recorder.joined if len(j) == 2]
    assert not any(7 in j and 17 in j for j in recorder.joined)


# ---- bad input ----

def test_bad_images_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"images must be \[B, 3, 32, 32\].*got shape \(2, 3, 48, 48\)"):
        model.visual_encoder(torch.randn(2, 3, 48, 48))
    with pytest.raises(ValueError, match="images must be"):
        model.visual_encoder(torch.randn(2, 1, 32, 32))
    with pytest.raises(TypeError, match="images have dtype torch.float16"):
        model.visual_encoder(torch.randn(2, 3, 32, 32, dtype=torch.float16))
    with pytest.raises(TypeError, match="images must be a torch.Tensor"):
        model.visual_encoder([[0.0]])


def test_bad_token_ids_and_masks_are_clear_errors():
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 5))
    with pytest.raises(ValueError, match=r"input_ids has ids in \[.*250\], outside the vocabulary \[0, 200\)"):
        model.text_encoder(torch.cat([ids, torch.full((2, 1), 250)], dim=1))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.text_encoder(ids - 300)
    with pytest.raises(TypeError, match="must be int64"):
        model.text_encoder(ids.float())
    with pytest.raises(ValueError, match="L <= 64"):
        model.text_encoder(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, Lk\] = \(2, 5\), got \(2, 4\)"):
        model.text_encoder(ids, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must have dtype torch.bool"):
        model.text_encoder(ids, torch.ones(2, 5))


def test_mismatched_batches_are_clear_errors():
    model = tiny_model()
    vision, text = torch.randn(2, 17, 64), torch.randn(3, 7, 64)
    with pytest.raises(ValueError, match="image_embeds has batch 2 but text_embeds has batch 3"):
        model.fusion_encoder(vision, None, text, None)
    with pytest.raises(ValueError, match=r"text_embeds must be \[B, L, 64\]"):
        model.fusion_encoder(vision, None, torch.randn(2, 7, 32), None)
    with pytest.raises(ValueError, match=r"image_mask must have shape \[B, Lk\] = \(2, 17\)"):
        model.fusion_encoder(vision, torch.ones(2, 16, dtype=torch.bool), text[:2], None)
    ids = torch.randint(0, 200, (3, 4))
    with pytest.raises(ValueError, match="input_ids has batch 3 but the memory has batch 2"):
        model.text_decoder(ids, None, memory=(vision,))
    with pytest.raises(ValueError, match="memory\\[1\\] has batch 3 but memory\\[0\\] has batch 2"):
        model.text_decoder(ids[:2], None, memory=(vision, text))
    with pytest.raises(ValueError, match="memory_masks has 1 entries but memory has 2"):
        model.text_decoder(ids[:2], None, memory=(vision, text[:2]), memory_masks=(None,))


def test_decoder_misuse_is_a_clear_error():
    model = tiny_model()
    ids = torch.randint(0, 200, (2, 3))
    memory = (torch.randn(2, 17, 64),)
    with pytest.raises(ValueError, match="memory=.* is required"):
        model.text_decoder(ids, None)
    _, cache = model.text_decoder(ids, None, memory=memory, use_cache=True)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.text_decoder(ids, None, cache=cache)
    with pytest.raises(ValueError, match="L <= 61"):
        model.text_decoder(torch.zeros(2, 62, dtype=torch.long), None, cache=cache, use_cache=True)
    with pytest.raises(TypeError, match="beam_indices must be a 1-D long tensor"):
        cache.reorder(torch.tensor([0.0, 1.0]))


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(fusion="sideways"), "fusion must be one of"),
        (dict(num_heads=5), "hidden_size / num_heads = 64 / 5"),
        (dict(image_size=36), "image_size 36 must be a multiple of patch_size 8"),
        (dict(mask_token_id=500), "mask_token_id = 500 is outside the vocabulary"),
        (dict(stride_layer=0), "stride_layer must be >= 1"),
        (dict(attn_backend="fastest"), "attn_backend must be 'auto' or one of"),
    ],
)
def test_bad_config_is_a_clear_error(changes, message):
    with pytest.raises(ValueError, match=message):
        MPLUG(MPLUGConfig.tiny(**changes))


# ---- the real sizes ----

@pytest.mark.parametrize("size", ["base", "large"])
def test_real_sizes_build_and_run_one_forward(size):
    """One batch-1 forward of mPLUG-base / -large at their fine-tuning resolution (Lv = 577) on the CPU."""
    config = getattr(MPLUGConfig, size)()
    with torch.device("cpu"):
        torch.manual_seed(0)
        model = MPLUG(config).eval()
    assert config.num_visual_tokens == 577
    images = torch.randn(1, 3, config.image_size, config.image_size)
    text_ids = torch.tensor([[101, 2054, 2003, 1999, 1996, 3746, 102]])
    with torch.no_grad():
        image_out, text_out, logits = run(model, images, text_ids, torch.ones_like(text_ids, dtype=torch.bool), text_ids[:, :2])
    assert image_out.shape == (1, 577, 768) and text_out.shape == (1, 7, 768)
    assert logits.shape == (1, 2, 30522) and torch.isfinite(logits).all()
