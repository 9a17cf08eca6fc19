"""BERT pieces with the official names: embeddings, feed-forward, the text encoder and the prediction head.

Text self-attention runs through ``mplug_kernels.co_attention`` (the same sequence as queries and
keys/values) on the configured backend, via ``mplug_kernels.nn.CoAttention``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from mplug_kernels._checks import check_mask
from mplug_kernels.nn import CoAttention
from mplug_kernels.nn.co_attention import AttentionOutput
from mplug_kernels.nn.connected_attention import Intermediate

from mplug.model.config import MPLUGConfig


def check_token_ids(name: str, ids, vocab_size: int, max_length: int) -> None:
    """Token ids must be an integer [B, L] tensor with 1 <= L <= max_length and values in [0, vocab_size)."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be int64 (or int32) token ids, got dtype {ids.dtype}")
    if ids.dim() != 2 or not 1 <= ids.shape[1] <= max_length:
        raise ValueError(f"{name} must be [B, L] with 1 <= L <= {max_length}, got shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(
            f"{name} has ids in [{int(ids.min())}, {int(ids.max())}], outside the vocabulary [0, {vocab_size})"
        )


def check_text_inputs(ids_name: str, ids, mask_name: str, mask, config: MPLUGConfig, past: int = 0) -> torch.Tensor:
    """Validate ids [B, L] and a bool mask [B, L] (None = all True); returns the mask."""
    check_token_ids(ids_name, ids, config.vocab_size, config.max_position_embeddings - past)
    if mask is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    check_mask(mask_name, mask, ids.shape[0], ids.shape[1], ids.device)
    return mask


class Embeddings(nn.Module):
    """BERT embeddings: word + position + token type 0, LayerNorm, dropout."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids: torch.Tensor, past_length: int = 0) -> torch.Tensor:
        """ids [B, L] (positions past_length .. past_length + L - 1) -> [B, L, hidden]."""
        positions = torch.arange(past_length, past_length + input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.dropout(self.LayerNorm(x))


class FeedForwardBlock(nn.Module):
    """A module holding BERT's ``intermediate`` and ``output``; ``feed_forward`` applies them."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.intermediate = Intermediate(config.hidden_size, config.intermediate_size)
        self.output = AttentionOutput(
            config.hidden_size, config.layer_norm_eps, config.dropout, input_size=config.intermediate_size
        )

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """x = LN(x + FFN(x)), [B, L, hidden]."""
        return self.output(self.intermediate(x), x)


def bert_attention(config: MPLUGConfig) -> CoAttention:
    """A BERT attention block (``self.query/key/value``, ``output.*``) on the configured backend."""
    return CoAttention(
        config.hidden_size,
        config.num_heads,
        layer_norm_eps=config.layer_norm_eps,
        dropout=config.dropout,
        backend=config.attn_backend,
    )


class TextLayer(FeedForwardBlock):
    """A BERT encoder layer: post-LN self-attention then feed-forward."""

    def __init__(self, config: MPLUGConfig):
        super().__init__(config)
        self.attention = bert_attention(config)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        """x [B, L, hidden], bool mask [B, L] -> [B, L, hidden]."""
        return self.feed_forward(self.attention(x, x, mask))


class LayerStack(nn.Module):
    """``encoder.layer``: the official container name for a list of layers."""

    def __init__(self, layers):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """BERT text encoder (official names ``embeddings``, ``encoder.layer.N``): ids -> [B, Lt, hidden]."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = LayerStack(TextLayer(config) for _ in range(config.text_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """input_ids [B, Lt], bool attention_mask [B, Lt] (True = attend) -> [B, Lt, hidden]."""
        mask = check_text_inputs("input_ids", input_ids, "attention_mask", attention_mask, self.config)
        x = self.embeddings(input_ids)
        for layer in self.encoder.layer:
            x = layer(x, mask)
        return x


class PredictionTransform(nn.Module):
    """BERT ``predictions.transform``: dense, GELU, LayerNorm."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] -> [B, L, hidden]."""
        return self.LayerNorm(F.gelu(self.dense(x)))


class PredictionHead(nn.Module):
    """BERT ``cls.predictions``: transform, then ``decoder`` (weight tied to word embeddings) + ``bias``."""

    def __init__(self, config: MPLUGConfig, word_embeddings: nn.Embedding):
        super().__init__()
        self.transform = PredictionTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.decoder.weight = word_embeddings.weight
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, hidden] -> logits [B, L, vocab]."""
        return self.decoder(self.transform(x)) + self.bias
