"""ConnectedAttention: mPLUG's connected-attention fusion layer, without concatenating [vision; text].

The layer is x = [v; t]; x = LN(x + SelfAttn(x)); x = LN(x + FFN(x)); split; v = v + v_new. Every
step except the attention works token by token, so each stream runs it on its own; the attention
runs through concat_attention with queries (v, t) over key/value sources (v, t), one running softmax.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from mplug_kernels.nn.co_attention import AttentionOutput, CoAttention, key_padding_mask_from, split_heads
from mplug_kernels.ops.co_attention import co_attention
from mplug_kernels.ops.concat_attention import concat_attention


class Intermediate(nn.Module):
    """BERT's ``intermediate``: dense to the FFN width, then GELU."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, S, hidden] -> [B, S, intermediate]."""
        return F.gelu(self.dense(hidden_states))


class ConnectedAttention(nn.Module):
    """Full self-attention over [vision; text] with BERT names; forward(vision, text, masks) -> (vision + v_new, t_new)."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        intermediate_size: int,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        self.backend = backend
        self.attention = CoAttention(hidden_size, num_heads, layer_norm_eps=layer_norm_eps, dropout=dropout, backend=backend)
        self.intermediate = Intermediate(hidden_size, intermediate_size)
        self.output = AttentionOutput(hidden_size, layer_norm_eps, dropout, input_size=intermediate_size)

    def _self_attention(self, streams, keeps) -> Tuple[torch.Tensor, ...]:
        """Each stream [B, S_i, hidden] attends to all streams; returns the post-LN outputs per stream."""
        projections, heads = self.attention.self, self.attention.num_heads
        qs = tuple(split_heads(projections.query(x), heads) for x in streams)
        ks = tuple(split_heads(projections.key(x), heads) for x in streams)
        vs = tuple(split_heads(projections.value(x), heads) for x in streams)
        masks = None if all(keep is None for keep in keeps) else keeps
        contexts = concat_attention(qs, ks, vs, masks, backend=self.backend)
        return tuple(self.attention.output(context.flatten(2), x) for context, x in zip(contexts, streams))

    def forward(
        self,
        vision: torch.Tensor,
        text: torch.Tensor,
        vision_mask: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """vision [B, Lv, hidden], text [B, Lt, hidden], masks bool/additive ([B, L] or [B, 1, 1, L]) -> (vision_out, text_out)."""
        keeps = (
            key_padding_mask_from(vision_mask, vision.shape[0], vision.shape[1]),
            key_padding_mask_from(text_mask, text.shape[0], text.shape[1]),
        )
        attended = self._self_attention((vision, text), keeps)
        vision_new, text_new = (self.output(self.intermediate(x), x) for x in attended)
        return vision + vision_new, text_new


def concatenated_connected_attention(
    layer: ConnectedAttention,
    vision: torch.Tensor,
    text: torch.Tensor,
    vision_mask: Optional[torch.Tensor] = None,
    text_mask: Optional[torch.Tensor] = None,
    backend: str = "sdpa",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The layer written the obvious way (torch.cat([v; t]), one attention, split): the baseline for tests and benchmarks."""
    batch, vision_len, text_len = vision.shape[0], vision.shape[1], text.shape[1]
    keeps = [key_padding_mask_from(vision_mask, batch, vision_len), key_padding_mask_from(text_mask, batch, text_len)]
    keep = None
    if any(k is not None for k in keeps):
        keep = torch.cat([k if k is not None else vision.new_ones((batch, n), dtype=torch.bool)
                          for k, n in zip(keeps, (vision_len, text_len))], dim=1)
    x = torch.cat([vision, text], dim=1)
    projections, heads = layer.attention.self, layer.attention.num_heads
    q, k, v = (split_heads(linear(x), heads) for linear in (projections.query, projections.key, projections.value))
    x = layer.attention.output(co_attention(q, k, v, keep, backend=backend).flatten(2), x)
    x = layer.output(layer.intermediate(x), x)
    return vision + x[:, :vision_len], x[:, vision_len:]
