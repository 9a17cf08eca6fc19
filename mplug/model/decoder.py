"""The answer/caption decoder: BERT layers with causal self-attention and cross-attention to [v; t].

Which attention runs where:
- cross-attention to the memory [v; t] (or [v] alone): ``mplug_kernels.nn.CoAttention`` with the
  memory sources as a tuple (``concat_attention`` on the configured backend; never concatenated).
  Without a cache each call projects the memory per layer (the authors' way); a cache projects it
  once for all layers with one wide GEMM per source (a ``CoAttentionStack`` cache);
- causal self-attention, one new query per sequence (a cached generation step): ``co_attention``
  over the cached keys on the configured backend (a single query needs no causal mask);
- causal self-attention over several queries (training, the uncached baseline, a cache's first
  call): ``co_attention`` on the configured backend with positional visibility (key j carries
  position j, query t position past + t: key j is visible iff j <= past + t), no dense mask.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn

from mplug_kernels import co_attention
from mplug_kernels._checks import check_mask
from mplug_kernels.nn.co_attention import AttentionOutput, AttentionProjections, split_heads
from mplug_kernels.nn.co_attention_stack import CoAttentionStack, LayerVisionKV, VisionKVCache

from mplug.model.config import MPLUGConfig
from mplug.model.text import Embeddings, FeedForwardBlock, LayerStack, PredictionHead, bert_attention, check_text_inputs

class DecoderCache:
    """Decoder state for incremental decoding: per-layer self-attention K/V [B, L, H, D] (grown each
    step) with their bool key mask [B, L], and the memory: its masks and a projected VisionKVCache
    holding the sources [B, L_i, hidden] and every layer's memory K/V (computed once)."""

    def __init__(self, memory_kv: VisionKVCache, memory_masks: Tuple[torch.Tensor, ...]):
        self.memory_kv = memory_kv.project()
        self.memory_masks = memory_masks
        self.self_kv: List[Optional[Tuple[torch.Tensor, torch.Tensor]]] = [None] * len(memory_kv)
        self.key_mask: Optional[torch.Tensor] = None

    @property
    def features(self) -> Tuple[torch.Tensor, ...]:
        """The memory sources [B, L_i, hidden]."""
        return self.memory_kv.features

    @property
    def length(self) -> int:
        """Tokens decoded so far (0 before the first step)."""
        return 0 if self.key_mask is None else self.key_mask.shape[1]

    @property
    def batch_size(self) -> int:
        """Rows of the cache (B, or B * beams after a reorder)."""
        return self.features[0].shape[0]

    def memory(self, layer: int) -> LayerVisionKV:
        """Layer ``layer``'s memory K/V entry."""
        return self.memory_kv[layer]

    def reorder(self, beam_indices: torch.Tensor, memory: bool = True) -> "DecoderCache":
        """Keep rows ``beam_indices`` (long [N]) of every cached tensor, in place; returns self.

        memory=False leaves the memory and its K/V as they are: right when rows only move between
        beams of the same image (their memory is identical) and the row count does not change.
        """
        if not isinstance(beam_indices, torch.Tensor) or beam_indices.dim() != 1 or beam_indices.dtype != torch.long:
            raise TypeError(f"beam_indices must be a 1-D long tensor, got {beam_indices!r}")
        pick = lambda xs: tuple(None if x is None else x.index_select(0, beam_indices) for x in xs)
        self.self_kv = [None if kv is None else pick(kv) for kv in self.self_kv]
        self.key_mask = None if self.key_mask is None else pick([self.key_mask])[0]
        if memory:
            self.memory_kv = self.memory_kv.select_rows(beam_indices)
            self.memory_masks = pick(self.memory_masks)
        return self


def causal_attention(q, k, v, key_mask, past_length: int, backend: str) -> torch.Tensor:
    """q [B, Lq, H, D] at positions past_length.. attends causally to k, v [B, Lk, H, D] under key_mask [B, Lk]."""
    if q.shape[1] == 1:
        return co_attention(q, k, v, key_mask, backend=backend)
    batch = q.shape[0]
    key_positions = torch.arange(k.shape[1], dtype=torch.int32, device=q.device).expand(batch, -1)
    query_positions = (torch.arange(q.shape[1], dtype=torch.int32, device=q.device) + past_length).expand(batch, -1)
    return co_attention(q, k, v, key_mask, key_positions=key_positions, query_positions=query_positions, backend=backend)


class CausalSelfAttention(nn.Module):
    """Decoder ``attention``: post-LN causal self-attention with BERT names, K/V appended to a cache."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.num_heads = config.num_heads
        self.backend = config.attn_backend
        self.self = AttentionProjections(config.hidden_size)
        self.output = AttentionOutput(config.hidden_size, config.layer_norm_eps, config.dropout)

    def forward(self, x, key_mask, past: Optional[Tuple[torch.Tensor, torch.Tensor]]):
        """x [B, L, hidden], key_mask [B, past + L] -> (x [B, L, hidden], (k, v) [B, past + L, H, D])."""
        q, k, v = (split_heads(proj(x), self.num_heads) for proj in (self.self.query, self.self.key, self.self.value))
        past_length = 0
        if past is not None:
            past_length = past[0].shape[1]
            k, v = torch.cat([past[0], k], dim=1), torch.cat([past[1], v], dim=1)
        context = causal_attention(q, k, v, key_mask, past_length, self.backend)
        return self.output(context.flatten(2), x), (k, v)


class DecoderLayer(FeedForwardBlock):
    """A decoder layer: causal self-attention, cross-attention to the memory, feed-forward (all post-LN)."""

    def __init__(self, config: MPLUGConfig):
        super().__init__(config)
        self.attention = CausalSelfAttention(config)
        self.crossattention = bert_attention(config)

    def forward(self, x, key_mask, past, memory, memory_masks, memory_kv: Optional[LayerVisionKV]):
        """x [B, L, hidden] -> (x [B, L, hidden], this layer's self-attention (k, v)); memory_kv=None projects memory here."""
        x, kv = self.attention(x, key_mask, past)
        return self.feed_forward(self.crossattention(x, memory, memory_masks, vision_kv=memory_kv)), kv


class TextDecoder(nn.Module):
    """``text_decoder``: ``bert.embeddings``, ``bert.encoder.layer.N`` and the tied LM head ``cls.predictions``."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.config = config
        self.bert = nn.ModuleDict(
            {"embeddings": Embeddings(config), "encoder": LayerStack(DecoderLayer(config) for _ in range(config.decoder_layers))}
        )
        self.cls = nn.ModuleDict({"predictions": PredictionHead(config, self.bert.embeddings.word_embeddings)})

    @property
    def layers(self) -> nn.ModuleList:
        return self.bert.encoder.layer

    def memory_cache(self, memory: Sequence[torch.Tensor], memory_masks: Optional[Sequence] = None) -> DecoderCache:
        """An empty DecoderCache with every layer's memory K/V from one wide GEMM per source
        (memory: (image_out[, text_out]) [B, L_i, hidden], masks bool [B, L_i] or None)."""
        features, masks = check_memory(memory, memory_masks, self.config.hidden_size)
        stack = CoAttentionStack([layer.crossattention for layer in self.layers])
        return DecoderCache(stack.vision_kv(*features), masks)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        memory: Optional[Sequence[torch.Tensor]] = None,
        memory_masks: Optional[Sequence] = None,
        cache: Optional[DecoderCache] = None,
        use_cache: bool = False,
    ):
        """input_ids [B, L] (only the new tokens when a cache is given), bool attention_mask [B, L],
        memory (image_out[, text_out]) [B, L_i, hidden] with bool masks [B, L_i] (None = attend all)
        -> logits [B, L, vocab], or (logits, cache) with use_cache=True.

        Without a cache every call re-runs the whole prefix (the authors' way). With use_cache=True
        the first call builds the cache (memory K/V computed once); later calls pass it back with
        only the new tokens, positions continuing from ``cache.length``; ``memory`` is then unused.
        """
        if cache is not None and not use_cache:
            raise ValueError("a cache was passed with use_cache=False; pass use_cache=True to decode incrementally")
        if cache is None and memory is None:
            raise ValueError("memory=(image_out[, text_out]) is required when no cache is given")
        if use_cache and cache is None:
            cache = self.memory_cache(memory, memory_masks)
        if cache is None:
            memory, memory_masks = check_memory(memory, memory_masks, self.config.hidden_size)
            past, past_mask, entries = 0, None, [None] * len(self.layers)
        else:
            memory, memory_masks = cache.features, cache.memory_masks
            past, past_mask, entries = cache.length, cache.key_mask, [cache.memory(i) for i in range(len(self.layers))]
        mask = check_text_inputs("input_ids", input_ids, "attention_mask", attention_mask, self.config, past)
        if input_ids.shape[0] != memory[0].shape[0]:
            raise ValueError(f"input_ids has batch {input_ids.shape[0]} but the memory has batch {memory[0].shape[0]}")
        key_mask = mask if past_mask is None else torch.cat([past_mask, mask], dim=1)
        x = self.bert.embeddings(input_ids, past)
        for i, layer in enumerate(self.layers):
            past_kv = None if cache is None else cache.self_kv[i]
            x, kv = layer(x, key_mask, past_kv, memory, memory_masks, entries[i])
            if cache is not None:
                cache.self_kv[i] = kv
        logits = self.cls.predictions(x)
        if cache is None:
            return logits
        cache.key_mask = key_mask
        return logits, cache


def check_memory(memory, memory_masks, hidden_size: int) -> Tuple[Tuple[torch.Tensor, ...], Tuple]:
    """Validate memory (1 or 2 tensors [B, L_i, hidden]) and masks (None, or one bool [B, L_i] or None per source)."""
    if not isinstance(memory, (tuple, list)) or not 1 <= len(memory) <= 2:
        raise TypeError("memory must be a tuple (image_out,) or (image_out, text_out) of [B, L_i, hidden] tensors")
    for i, m in enumerate(memory):
        if not isinstance(m, torch.Tensor) or m.dim() != 3 or m.shape[2] != hidden_size or m.shape[1] == 0:
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(f"memory[{i}] must be [B, L, {hidden_size}] with L >= 1, got {shape}")
        if m.shape[0] != memory[0].shape[0]:
            raise ValueError(f"memory[{i}] has batch {m.shape[0]} but memory[0] has batch {memory[0].shape[0]}")
    masks = tuple(memory_masks) if memory_masks is not None else (None,) * len(memory)
    if len(masks) != len(memory):
        raise ValueError(f"memory_masks has {len(masks)} entries but memory has {len(memory)} sources")
    for i, (m, mask) in enumerate(zip(memory, masks)):
        if mask is not None:
            check_mask(f"memory_masks[{i}]", mask, m.shape[0], m.shape[1], m.device)
    return tuple(memory), masks
