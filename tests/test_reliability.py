"""The defects adversarial probing found (issue 16), each pinned by its reproducer: masked NaN, float 0/1 masks, empty
batches, merged empty parts; and in the model: poisoned ITC queues, NaN retrieval scores, checkpoint loading that
fails half way, all-padding texts, generation past the position limit, unclear argument errors."""
from __future__ import annotations

import pytest
import torch

import mplug_kernels
from mplug import MPLUG, MPLUGConfig, load_official_checkpoint
from mplug_kernels.nn.co_attention import CoAttention
from attention_testing import skip_unless_supported
from test_model_tasks import batch

ATTENTION_BACKENDS = ["reference", "sdpa", "triton", "cuda"]


def _attention_inputs(dtype, requires_grad=False, batch=2, q_len=3, k_len=6, heads=2, head_dim=32):
    generator = torch.Generator().manual_seed(0)
    make = lambda length: torch.randn(batch, length, heads, head_dim, generator=generator).to(dtype).requires_grad_(requires_grad)
    mask = torch.ones(batch, k_len, dtype=torch.bool)
    mask[:, -2:] = False
    return make(q_len), make(k_len), make(k_len), mask


def _dtype(backend):
    return torch.float16 if backend == "cuda" else torch.float32


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("planted", ["key", "value"])
def test_nan_in_a_masked_key_or_value_changes_nothing(backend, planted):
    """Issue 16 item 11: sdpa returned NaN for a masked NaN key; a masked NaN value made the (batch, head) NaN everywhere."""
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True)
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    clean = mplug_kernels.co_attention(q, k, v, mask, backend=backend)
    dirty_k, dirty_v = k.detach().clone(), v.detach().clone()
    (dirty_k if planted == "key" else dirty_v)[:, -1] = float("nan")
    dirty_k.requires_grad_(), dirty_v.requires_grad_()
    dirty = mplug_kernels.co_attention(q, dirty_k, dirty_v, mask, backend=backend)
    assert torch.equal(dirty, clean)
    seed = torch.randn(clean.shape, generator=torch.Generator().manual_seed(1)).to(clean.dtype)
    clean_grads = torch.autograd.grad((clean * seed).sum(), [q, k, v])
    dirty_grads = torch.autograd.grad((dirty * seed).sum(), [q, dirty_k, dirty_v])
    for name, dirty_grad, clean_grad in zip(("dq", "dk", "dv"), dirty_grads, clean_grads):
        assert torch.equal(dirty_grad, clean_grad), f"{name} changed by a NaN in a masked {planted}"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_nan_query_of_a_fully_masked_row_gives_zeros(backend):
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True)
    mask[0] = False
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=False)
    dirty_q = q.detach().clone()
    dirty_q[0] = float("nan")
    dirty_q.requires_grad_()
    out = mplug_kernels.co_attention(dirty_q, k, v, mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and not out[1].isnan().any()
    grads = torch.autograd.grad(out.float().sum(), [dirty_q, k, v])
    assert all(not g.isnan().any() for g in grads) and torch.equal(grads[0][0], torch.zeros_like(grads[0][0]))


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_empty_batch_gives_empty_outputs_and_gradients(backend):
    """Issue 16 item 3: B = 0 raised ZeroDivisionError (triton) and "needs a delta workspace" (cuda backward)."""
    q, k, v, mask = _attention_inputs(_dtype(backend), requires_grad=True, batch=0)
    return_lse = backend != "sdpa"
    skip_unless_supported(backend, q, [k], [v], [mask], return_lse=return_lse)
    result = mplug_kernels.co_attention(q, k, v, mask, return_lse=return_lse, backend=backend)
    out = result[0] if return_lse else result
    assert out.shape == q.shape
    if return_lse:
        assert result[1].shape == (0, q.shape[2], q.shape[1])
    grads = torch.autograd.grad(out.float().sum(), [q, k, v])
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_merge_ignores_the_out_of_a_part_without_keys():
    """A part with lse = -inf holds no key: whatever its out holds (NaN here) neither reaches the result nor its gradients."""
    generator = torch.Generator().manual_seed(0)
    full = torch.randn(2, 3, 2, 8, generator=generator, requires_grad=True)
    full_lse = torch.randn(2, 2, 3, generator=generator, requires_grad=True)
    empty = torch.full((2, 3, 2, 8), float("nan"), requires_grad=True)
    empty_lse = torch.full((2, 2, 3), float("-inf"))
    out, lse = mplug_kernels.merge_attention_states((full, empty), (full_lse, empty_lse))
    assert torch.equal(out, full) and torch.equal(lse, full_lse)
    grads = torch.autograd.grad(out.sum() + lse.sum(), [full, full_lse, empty])
    assert all(not g.isnan().any() for g in grads)


def _co_attention_layer():
    torch.manual_seed(0)
    return CoAttention(32, 2, backend="reference").eval()


def test_float_zero_one_mask_is_refused_as_ambiguous():
    """Issue 16 item 2: a float 0/1 mask was read as additive, so padding was attended (output off by 0.24)."""
    layer = _co_attention_layer()
    text, vision = torch.randn(2, 3, 32), torch.randn(2, 5, 32)
    keep = torch.tensor([[1.0, 1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match=r"additive.*0 = attend.*bool"):
        layer(text, vision, keep)
    expected = layer(text, vision, keep.bool())
    additive = (1.0 - keep) * -10000.0
    assert torch.allclose(layer(text, vision, additive), expected)
    assert torch.allclose(layer(text, vision, torch.zeros(2, 5).masked_fill(keep == 0, float("-inf"))), expected)
    assert torch.allclose(layer(text, vision, torch.zeros(2, 5)), layer(text, vision, None))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MPLUG(MPLUGConfig.tiny(attn_backend="reference")).eval()


def _batch(size, length=8, seed=0):
    """Random float32 images [size, 3, 32, 32] and right-padded texts (test_model_tasks.batch)."""
    return batch(size, length, seed, dtype=torch.float32)


@pytest.mark.parametrize("distill", [False, True])
def test_a_non_finite_batch_does_not_poison_the_itc_queues(distill):
    """Issue 16 item 1: a NaN image enqueued NaN features, and every later clean batch got itc = NaN."""
    torch.manual_seed(0)
    training = MPLUG(MPLUGConfig.tiny(attn_backend="reference")).train()
    images, ids, mask = _batch(4)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="1 image-text pair"):
        training.pretrain_losses(bad, ids, mask, objectives=("itc",), distill=distill)
    assert torch.isfinite(training.image_queue).all() and torch.isfinite(training.text_queue).all()
    assert int(training.queue_ptr) == 3
    assert torch.isfinite(training.pretrain_losses(images, ids, mask, objectives=("itc",), distill=distill)["itc"])


def test_retrieval_names_the_image_with_non_finite_features(model):
    """Issue 16 item 4: topk ranked NaN first, so a NaN image took over every text's shortlist."""
    images, ids, mask = _batch(3)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"images \[1\] give non-finite features"):
        model.retrieval_scores(images, ids, mask, k=2)


def _official_state(config):
    from test_checkpoint import official_state_dict

    return official_state_dict(config, pretrained=True)[0]


def _snapshot(model):
    return {key: value.detach().clone() for key, value in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(before[key], value) for key, value in model.state_dict().items())


def test_strict_checkpoint_load_changes_nothing_when_it_fails():
    """Issue 16 item 5: with one key missing, 172 of 245 parameters were overwritten before the RuntimeError."""
    config = MPLUGConfig.tiny()
    target = MPLUG(config)
    before = _snapshot(target)
    state = _official_state(config)
    del state["itm_head.bias"]
    with pytest.raises(RuntimeError, match="itm_head.bias"):
        load_official_checkpoint(target, state, strict=True)
    assert _unchanged(target, before)


def test_non_finite_checkpoint_values_warn_or_raise_when_strict():
    config = MPLUGConfig.tiny()
    state = _official_state(config)
    state["itm_head.weight"] = state["itm_head.weight"].clone()
    state["itm_head.weight"][0, 0] = float("nan")
    target = MPLUG(config)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="NaN or inf.*itm_head.weight"):
        load_official_checkpoint(target, state, strict=True)
    assert _unchanged(target, before)
    with pytest.warns(RuntimeWarning, match="itm_head.weight"):
        load_official_checkpoint(target, state)


def test_our_own_state_dict_is_refused_not_remapped():
    """Issue 16 item 5: our own layout was silently remapped (fusion layer k + 2 onto k)."""
    config = MPLUGConfig.tiny()
    target = MPLUG(config)
    before = _snapshot(target)
    with pytest.raises(ValueError, match="our MPLUG layout.*load_state_dict"):
        load_official_checkpoint(target, MPLUG(config).state_dict())
    assert _unchanged(target, before)


def test_all_padding_text_row_is_named(model):
    """Issue 16 item 6: an all-padding text row crashed the PrefixLM split with "index -1 is out of bounds"."""
    images, ids, mask = _batch(3)
    mask[1] = False
    with pytest.raises(ValueError, match=r"text_mask: rows \[1\]"):
        model.pretrain_losses(images, ids, mask)


def test_generation_past_the_position_limit_is_refused_up_front(model):
    """Issue 16 item 7: generation failed mid-way ("1 <= L <= 0"); max_length=10**9 tried to allocate 80 GB."""
    images, ids, mask = _batch(1)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.caption_generate(images, max_length=10**9)
    with pytest.raises(ValueError, match=f"max_length <= {limit}"):
        model.caption_generate(images, num_beams=1, max_length=limit + 1)
    out = model.caption_generate(images, num_beams=1, min_length=limit - 1, max_length=limit)
    assert out.sequences.shape[-1] == limit
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.vqa_generate(images, ids, mask, max_length=limit + 1)


@pytest.mark.parametrize("num_beams", [-1, 0, 2.5, True])
def test_bad_num_beams_is_named(model, num_beams):
    images, ids, mask = _batch(1)
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        model.vqa_generate(images, ids, mask, num_beams=num_beams)


def test_int32_ids_and_missing_text_mask_are_accepted(model):
    """Issue 16 item 10: int32 ids crashed in cross_entropy; text_mask=None crashed ("NoneType not subscriptable")."""
    images, ids, mask = _batch(2)
    full = torch.ones_like(mask)
    choices = dict(generator=torch.Generator().manual_seed(0), objectives=("itc", "mlm", "prefix_lm"), update_queue=False)
    expected = model.pretrain_losses(images, ids, full, **choices)
    choices["generator"] = torch.Generator().manual_seed(0)
    got = model.pretrain_losses(images, ids.int(), None, **choices)
    assert all(torch.equal(got[name], expected[name]) for name in expected)


def test_three_dimensional_images_are_named(model):
    """Issue 16 item 10: images [3, H, W] were reported as "batch 3 vs 2"."""
    images, ids, mask = _batch(2)
    with pytest.raises(ValueError, match=r"images must be a float tensor \[B, 3, H, W\], got shape \(3, 32, 32\)"):
        model.pretrain_losses(images[0], ids, mask)


def test_retrieval_with_no_texts_is_named(model):
    images, ids, mask = _batch(2)
    with pytest.raises(ValueError, match="text_ids"):
        model.retrieval_scores(images, ids[:0], mask[:0])


def test_one_row_position_embedding_is_named():
    config = MPLUGConfig.tiny()
    state = _official_state(config)
    key = "visual_encoder.visual.positional_embedding"
    state[key] = state[key][:1]
    with pytest.raises(ValueError, match=key):
        load_official_checkpoint(MPLUG(config), state)


def test_non_string_checkpoint_key_is_named():
    config = MPLUGConfig.tiny()
    state = _official_state(config)
    state[7] = torch.zeros(1)
    with pytest.raises(TypeError, match="keys must be str.*7"):
        load_official_checkpoint(MPLUG(config), state)


@pytest.mark.parametrize("content", [b"", b"this is a text file\n"], ids=["empty", "text"])
def test_a_file_that_is_not_a_checkpoint_is_named(tmp_path, content):
    """Issue 16 item 10: an empty or text file raised a bare EOFError or "KeyError: 101"."""
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="not a PyTorch checkpoint"):
        load_official_checkpoint(MPLUG(MPLUGConfig.tiny()), path)
