"""mplug_kernels inside Hugging Face transformers models (``pip install mplug-kernels[hf]``).

``register()`` adds an attention implementation, and the mask function that goes with it, under one name:
``BertModel.from_pretrained(..., attn_implementation=register())`` then runs cross-attention and bidirectional
self-attention on ``mplug_kernels.co_attention``. ``apply_mplug_kernels_to_blip(model)`` patches BLIP's text
attention, which does not dispatch through transformers' AttentionInterface. Causal attention (``is_causal``
without a mask, or a mask that our mask function built from transformers' plain causal mask function and a key
padding mask) runs through positional visibility (key position <= query position). Calls the kernels cannot serve
exactly (other per-query masks, attention dropout in training, attention weights requested) run transformers' own
attention instead, with one warning per reason. This module imports transformers only when one of them is called.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import sys
import warnings
from typing import Optional, Tuple

import torch

from mplug_kernels._checks import MAX_HEAD_DIM
from mplug_kernels.backends import get_backend
from mplug_kernels.nn.co_attention import MASKED_BELOW, keep_from_additive
from mplug_kernels.ops import co_attention

DEFAULT_NAME = "mplug_kernels"
# Arguments of transformers' attention functions that change the math beyond a key padding mask.
UNSUPPORTED_KWARGS = ("softcap", "sliding_window", "s_aux", "position_bias", "cu_seq_lens_q", "cu_seq_lens_k")
_BUILTIN_NAMES = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4")
_warned_reasons = set()
_cross_kv_memo: contextvars.ContextVar = contextvars.ContextVar("mplug_kernels_cross_kv_memo", default=None)
# padding_mask sets this attribute on a causal mask it built: (key positions [B, Lk], query positions [B, Lq],
# key padding bool [B, Lk] or None), the same visibility as the mask's values.
CAUSAL_ATTRIBUTE = "_mplug_kernels_causal"


class FallbackWarning(UserWarning):
    """A call ran on transformers' own attention because mplug_kernels cannot compute it exactly."""


def _transformers():
    try:
        import transformers
        import transformers.masking_utils  # noqa: F401
    except ImportError as error:
        raise ImportError(
            f"mplug_kernels.integrations.transformers needs transformers >= 5.0 with masking_utils "
            f"(pip install 'mplug-kernels[hf]'): {error}"
        ) from error
    return transformers


def _warn_once(reason: str) -> None:
    kind = re.sub(r"shape \([^)]*\)", "shape", reason)  # one warning per reason, whatever the mask's shape
    if kind not in _warned_reasons:
        _warned_reasons.add(kind)
        warnings.warn(f"mplug_kernels: {reason}; this call runs on transformers' own attention", FallbackWarning,
                      stacklevel=3)


def _shared_row(mask: torch.Tensor) -> Optional[torch.Tensor]:
    """mask [B|1, H|1, Lq|1, Lk] -> its one row [B|1, Lk] when every head and query sees the same keys, else None."""
    for dim in (1, 2):
        if mask.shape[dim] != 1 and mask.stride(dim) != 0:
            return None
    return mask[:, 0, 0, :]


def key_padding_mask(mask: Optional[torch.Tensor], batch: int) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    """(bool [B, Lk] True = attend, None) from transformers' 4-D bool or additive mask, or (None, why it is not one)."""
    if mask is None:
        return None, None
    if mask.dim() != 4:
        return None, f"a {mask.dim()}-D attention mask (only 4-D masks [B, 1, 1|Lq, Lk] are understood)"
    row = _shared_row(mask)
    if row is None:
        return None, (f"a 4-D mask of shape {tuple(mask.shape)} that may differ per query or head (causal, or "
                      f"materialised per query; ours take one key padding mask row [B, 1, 1, Lk])")
    if row.dtype != torch.bool:
        try:
            row = keep_from_additive(row)
        except ValueError:
            return None, f"an additive mask with values other than 0 and <= {MASKED_BELOW:g} (a bias, not padding)"
    return row.expand(batch, row.shape[-1]), None


def additive_mask(mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """A bool mask (True = attend) as the additive float mask eager attention adds to its scores; others unchanged."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def _head_dim_reason(head_dim: int) -> Optional[str]:
    if head_dim % 8 or head_dim > MAX_HEAD_DIM:
        return f"head dim {head_dim} (ours take multiples of 8 up to {MAX_HEAD_DIM})"
    return None


def _call_reason(query, dropout, kwargs) -> Optional[str]:
    """Why an AttentionInterface call ([B, H, L, D] tensors) cannot run on our kernels, or None."""
    if kwargs.get("output_attentions"):
        return "output_attentions (attention weights are requested)"
    if dropout and dropout > 0:
        return "attention dropout > 0 in training"
    given = [name for name in UNSUPPORTED_KWARGS if kwargs.get(name) is not None]
    if given:
        return f"argument {given[0]}"
    return _head_dim_reason(query.shape[-1])


def _arange(length: int, offset, batch: int, device) -> torch.Tensor:
    """int32 [batch, length]: offset, offset + 1, ... (offset an int or a 0-D tensor; no host sync)."""
    return (torch.arange(length, device=device) + offset).to(torch.int32).expand(batch, length)


def _visibility(backend, module, query, key, attention_mask, is_causal):
    """(keep bool [B, Lk] or None, (key positions, query positions) or None, None) for our kernels, or
    (None, None, why they cannot take this mask)."""
    batch, q_len, k_len = query.shape[0], query.shape[2], key.shape[2]
    positions = None
    if attention_mask is None:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        if not causal or q_len == 1:
            return None, None, None
        keep, positions = None, (_arange(k_len, 0, batch, query.device), _arange(q_len, 0, batch, query.device))
    else:
        keep, reason = key_padding_mask(attention_mask, batch)
        described = getattr(attention_mask, CAUSAL_ATTRIBUTE, None)
        if reason is None or described is None:
            return keep, None, reason
        key_positions, query_positions, keep = described
        if key_positions.shape != (batch, k_len) or query_positions.shape != (batch, q_len):
            return None, None, reason
        positions = key_positions, query_positions
    if backend != "auto" and not get_backend(backend).supports_positions:
        return None, None, f"causal attention over several queries on {backend} (it takes no key/query positions)"
    return keep, positions, None


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    """transformers' own answer: the model's eager attention when weights are requested, else SDPA."""
    _warn_once(reason)
    if kwargs.get("output_attentions"):
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is not None:
            mask = additive_mask(attention_mask, query.dtype)
            return eager(module, query, key, value, mask, scaling=scaling, dropout=dropout, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


def attention_forward(backend, module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """transformers' signature: query [B, Hq, Lq, D], key/value [B, Hkv, Lk, D] -> (out [B, Lq, Hq, D], None), ours."""
    reason = _call_reason(query, dropout, kwargs)
    if reason is None and key.shape[1] != query.shape[1] and backend != "auto":
        if not get_backend(backend).supports_grouped_heads:
            reason = f"grouped-query attention ({query.shape[1]} query heads, {key.shape[1]} key/value heads) on {backend}"
    keep = positions = None
    if reason is None:
        keep, positions, reason = _visibility(backend, module, query, key, attention_mask, is_causal)
    if reason is not None:
        return _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    key_positions, query_positions = positions if positions is not None else (None, None)
    out = co_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), keep,
                       key_positions=key_positions, query_positions=query_positions, softmax_scale=scaling,
                       backend=backend)
    return out, None


def _causal_description(kwargs, mask: torch.Tensor):
    """CAUSAL_ATTRIBUTE's value for the mask sdpa_mask built from kwargs, or None unless its mask function is
    transformers' plain causal one (key kv_offset + j visible to query q_offset + t iff j + kv_offset <= t + q_offset,
    and the key padding mask keeps it)."""
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask

    if kwargs.get("mask_function") is not causal_mask_function or "q_length" not in kwargs:
        return None
    batch, kv_length, kv_offset = mask.shape[0], kwargs["kv_length"], kwargs.get("kv_offset", 0)
    key_positions = _arange(kv_length, kv_offset, batch, mask.device)
    query_positions = _arange(kwargs["q_length"], kwargs.get("q_offset", 0), batch, mask.device)
    padding = prepare_padding_mask(kwargs.get("attention_mask"), kv_length, kv_offset)
    keep = None
    if padding is not None:
        keep = padding.to(device=mask.device, dtype=torch.bool)[:, key_positions[0].long()].expand(batch, kv_length)
    return key_positions, query_positions, keep


def padding_mask(**kwargs):
    """transformers' boolean SDPA mask, always materialised, one row [B, 1, 1, Lk] when it only pads keys, and
    CAUSAL_ATTRIBUTE set when it is transformers' plain causal mask (plus key padding)."""
    from transformers.masking_utils import bidirectional_mask_function, sdpa_mask

    if kwargs.get("mask_function") is bidirectional_mask_function:
        if "q_length" in kwargs:  # transformers >= 5.3 passes the query length, earlier 5.x the query positions
            kwargs["q_length"] = 1
        if "cache_position" in kwargs:
            kwargs["cache_position"] = kwargs["cache_position"][:1]
    kwargs["allow_is_causal_skip"] = False
    mask = sdpa_mask(**kwargs)
    described = _causal_description(kwargs, mask) if mask is not None else None
    if described is not None:
        setattr(mask, CAUSAL_ATTRIBUTE, described)
    return mask


def register(name: str = DEFAULT_NAME, backend: str = "auto") -> str:
    """Register our attention and mask function with transformers as ``name`` (kernels of ``backend``); returns name."""
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name or name in _BUILTIN_NAMES:
        raise ValueError(f"name must be a new non-empty str, not one of transformers' {_BUILTIN_NAMES}; got {name!r}")
    if backend != "auto":
        get_backend(backend)
    transformers.AttentionInterface.register(name, functools.partial(attention_forward, backend))
    AttentionMaskInterface.register(name, padding_mask)
    return name


def _blip_fallback_reason(module, mask, batch) -> Tuple[Optional[torch.Tensor], Optional[str]]:
    if module.training and module.dropout.p > 0:
        return None, "attention dropout > 0 in training"
    reason = _head_dim_reason(module.attention_head_size)
    if reason:
        return None, reason
    return key_padding_mask(mask, batch)


def _heads(module, x: torch.Tensor) -> torch.Tensor:
    """[B, L, H * D] -> [B, L, H, D] (a view)."""
    return x.view(*x.shape[:2], -1, module.attention_head_size)


def _projected_kv(module, states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """K, V [B, L, H, D] of states; inside a patched generate, each layer projects one encoder output only once."""
    memo = _cross_kv_memo.get()
    entry = memo.get(module) if memo is not None else None
    if entry is not None and entry[0] is states and entry[1] == states._version:
        return entry[2], entry[3]
    k, v = _heads(module, module.key(states)), _heads(module, module.value(states))
    if memo is not None:
        memo[module] = (states, states._version, k, v)
    return k, v


def _blip_kv(module, hidden_states, encoder_hidden_states, cache):
    """K, V [B, Lk, H, D] for a BLIP text attention layer, read from or written to transformers' cache as BLIP does."""
    from transformers.cache_utils import EncoderDecoderCache

    cross = encoder_hidden_states is not None
    layer_cache = cache
    if isinstance(cache, EncoderDecoderCache):
        layer_cache = cache.cross_attention_cache if cross else cache.self_attention_cache
        if cross and cache.is_updated.get(module.layer_idx):
            layer = layer_cache.layers[module.layer_idx]
            return layer.keys.transpose(1, 2), layer.values.transpose(1, 2)
    k, v = _projected_kv(module, encoder_hidden_states) if cross else (
        _heads(module, module.key(hidden_states)), _heads(module, module.value(hidden_states)))
    if layer_cache is None:
        return k, v
    k, v = layer_cache.update(k.transpose(1, 2), v.transpose(1, 2), module.layer_idx)
    if cross and isinstance(cache, EncoderDecoderCache):
        cache.is_updated[module.layer_idx] = True
    return k.transpose(1, 2), v.transpose(1, 2)


def _attention_weights_requested() -> bool:
    """Whether transformers' output capturing (output_attentions=True) is collecting attention weights now."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:
        return False
    collected = _active_collector.get()
    return bool(collected) and ("attentions" in collected or "cross_attentions" in collected)


def _blip_attention(module, hidden_states, attention_mask=None, encoder_hidden_states=None,
                    encoder_attention_mask=None, **kwargs):
    """BlipTextSelfAttention.forward on our kernels: hidden_states [B, Lq, hidden] -> ([B, Lq, hidden], None)."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))  # renamed in transformers 5.x
    mask = encoder_attention_mask if encoder_hidden_states is not None else attention_mask
    if _attention_weights_requested():
        keep, reason = None, "output_attentions (attention weights are requested)"
    else:
        keep, reason = _blip_fallback_reason(module, mask, hidden_states.shape[0])
    if reason is not None:
        _warn_once(reason)
        dtype = hidden_states.dtype
        original = type(module).__mro__[1].forward  # BlipTextSelfAttention.forward
        return original(
            module, hidden_states, attention_mask=additive_mask(attention_mask, dtype),
            encoder_hidden_states=encoder_hidden_states,
            encoder_attention_mask=additive_mask(encoder_attention_mask, dtype), **kwargs,
        )
    q = _heads(module, module.query(hidden_states))
    k, v = _blip_kv(module, hidden_states, encoder_hidden_states, cache)
    out = co_attention(q, k, v, keep, backend=module._mplug_kernels_backend)
    return out.reshape(*hidden_states.shape[:2], -1), None


@contextlib.contextmanager
def cross_kv_once():
    """Inside this block each patched BLIP layer projects a given encoder output to K/V once, not once per step."""
    token = _cross_kv_memo.set({})
    try:
        yield
    finally:
        _cross_kv_memo.reset(token)


def blip_padding_mask(**kwargs):
    """padding_mask as an additive float mask (dtype from kwargs): BLIP's own eager attention adds it correctly too."""
    mask = padding_mask(**kwargs)
    return additive_mask(mask, kwargs.get("dtype", torch.float32))


def _register_blip(name: str) -> None:
    transformers = _transformers()
    from transformers.masking_utils import AttentionMaskInterface

    transformers.AttentionInterface.register(name, functools.partial(attention_forward, "auto"))
    AttentionMaskInterface.register(name, blip_padding_mask)


def _blip_classes():
    """(self-attention, LM head) subclasses of BLIP's that run on our kernels, made once; pickled by reference."""
    if "_BLIP_CLASSES" in globals():
        return _BLIP_CLASSES
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextSelfAttention

    class MplugBlipTextSelfAttention(BlipTextSelfAttention):
        """BlipTextSelfAttention on mplug_kernels (backend in ``_mplug_kernels_backend``)."""

        forward = _blip_attention

        def __setstate__(self, state):
            super().__setstate__(state)
            _register_blip(self._mplug_kernels_mask_name)  # a fresh process (torch.load) knows the mask name again

    class MplugBlipTextLMHeadModel(BlipTextLMHeadModel):
        """BlipTextLMHeadModel whose generate projects each encoder output to cross-attention K/V once per layer."""

        def generate(self, *args, **kwargs):
            """GenerationMixin.generate inside cross_kv_once()."""
            with cross_kv_once():
                return super().generate(*args, **kwargs)

    for cls in (MplugBlipTextSelfAttention, MplugBlipTextLMHeadModel):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    globals()["_BLIP_CLASSES"] = (MplugBlipTextSelfAttention, MplugBlipTextLMHeadModel)
    return _BLIP_CLASSES


def __getattr__(attribute: str):
    """The BLIP subclasses, made on first use (this module imports transformers only when asked)."""
    if attribute in ("MplugBlipTextSelfAttention", "MplugBlipTextLMHeadModel"):
        attention, lm_head = _blip_classes()
        return attention if attribute == "MplugBlipTextSelfAttention" else lm_head
    raise AttributeError(f"module {__name__!r} has no attribute {attribute!r}")


def apply_mplug_kernels_to_blip(model: torch.nn.Module, backend: str = "auto", name: str = DEFAULT_NAME):
    """Patch every BLIP text self-/cross-attention layer of ``model`` in place to run on our kernels; returns model.

    Each layer's class becomes a subclass (so copies, torch.save/torch.load and config sharing behave); the text
    configs are changed in place to build additive key padding masks of one row (``{name}_blip``), which BLIP's own
    attention also reads correctly."""
    register(name, backend)
    mask_name = f"{name}_blip"
    _register_blip(mask_name)
    from transformers.models.blip.modeling_blip_text import BlipTextLMHeadModel, BlipTextModel, BlipTextSelfAttention

    attention_class, lm_head_class = _blip_classes()
    found = False
    for module in model.modules():
        if isinstance(module, (BlipTextModel, BlipTextLMHeadModel)):
            module.config._attn_implementation = mask_name
        if type(module) is BlipTextLMHeadModel:
            module.__class__ = lm_head_class
        if isinstance(module, BlipTextSelfAttention):
            found = True
            module.__class__ = attention_class
            module._mplug_kernels_backend, module._mplug_kernels_mask_name = backend, mask_name
    if not found:
        raise ValueError(f"model ({type(model).__name__}) has no BLIP text attention layer (BlipTextSelfAttention)")
    return model
