"""The cross-modal fusion network: skip-connected (the paper), all-connected or two-way co-attention.

Fusion layer k is stored as the official ``fusion_encoder.encoder.layer.{text_layers + k}`` and is
ours ``fusion_encoder.encoder.layer.k``. Vision and text are never concatenated: connected layers are
``mplug_kernels.nn.ConnectedAttention`` (concat_attention over the two streams), and in the
skip-connected network each run of co-attention layers between connected layers shares one
``CoAttentionStack``: the vision stays constant along the run, so all its cross-attention K/V come
from one wide GEMM.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mplug_kernels._checks import check_mask
from mplug_kernels.profiling import nvtx_range
from mplug_kernels.nn import CoAttentionStack, ConnectedAttention

from mplug.model.config import MPLUGConfig
from mplug.model.text import FeedForwardBlock, LayerStack, bert_attention


class CoAttentionLayer(FeedForwardBlock):
    """Asymmetric co-attention: x = LN(x + SelfAttn(x)); x = LN(x + CrossAttn(x, memory)); x = LN(x + FFN(x))."""

    def __init__(self, config: MPLUGConfig):
        super().__init__(config)
        self.attention = bert_attention(config)
        self.crossattention = bert_attention(config)

    def forward(self, x, x_mask, memory=None, memory_mask=None, vision_kv=None) -> torch.Tensor:
        """x [B, L, hidden] attends to itself, then to memory [B, Lm, hidden] (or its stack K/V entry ``vision_kv``)."""
        x = self.attention(x, x, x_mask)
        return self.feed_forward(self.crossattention(x, memory, memory_mask, vision_kv=vision_kv))


def connected_attention(config: MPLUGConfig) -> ConnectedAttention:
    """A connected-attention fusion layer with the configured sizes and backend."""
    return ConnectedAttention(
        config.hidden_size,
        config.num_heads,
        config.intermediate_size,
        layer_norm_eps=config.layer_norm_eps,
        dropout=config.dropout,
        backend=config.attn_backend,
    )


def layer_runs(config: MPLUGConfig) -> List[Tuple[int, int]]:
    """[start, stop) ranges of fusion layers sharing a constant vision: connected and two-way layers alone,
    consecutive text-only co-attention layers together."""
    runs: List[Tuple[int, int]] = []
    for k in range(config.fusion_layers):
        alone = config.is_connected_layer(k) or config.fusion == "two_way"
        if runs and not alone and runs[-1][1] == k and not config.is_connected_layer(runs[-1][0]):
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


class FusionEncoder(nn.Module):
    """``fusion_encoder``: (image_embeds, image_mask, text_embeds, text_mask) -> (image_out, text_out).

    "skip": layer k is ConnectedAttention when k != 0 and k % stride_layer == 0, else a
    CoAttentionLayer on text only (vision skips it). "connected": every layer connected. "two_way":
    vision also runs a CoAttentionLayer over text each layer (``vision_encoder.layer.k``), both
    streams reading the previous layer's output.
    """

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = config.gradient_checkpointing
        self.encoder = LayerStack(
            connected_attention(config) if config.is_connected_layer(k) else CoAttentionLayer(config)
            for k in range(config.fusion_layers)
        )
        if config.fusion == "two_way":
            self.vision_encoder = LayerStack(CoAttentionLayer(config) for _ in range(config.fusion_layers))

    def forward(
        self,
        image_embeds: torch.Tensor,
        image_mask: Optional[torch.Tensor],
        text_embeds: torch.Tensor,
        text_mask: Optional[torch.Tensor],
    ):
        """image_embeds [B, Lv, hidden], text_embeds [B, Lt, hidden], bool masks [B, L] (None = attend all) -> (image_out, text_out)."""
        check_fusion_inputs(image_embeds, image_mask, text_embeds, text_mask, self.config.hidden_size)
        vision, text = image_embeds, text_embeds
        for start, stop in layer_runs(self.config):
            first = self.encoder.layer[start]
            if isinstance(first, ConnectedAttention):
                vision, text = self._run(f"fusion.layer{start}", first, vision, text, image_mask, text_mask)
            elif self.config.fusion == "two_way":
                text, vision = (
                    self._run(f"fusion.layer{start}", first, text, text_mask, vision, image_mask),
                    self._run(
                        f"fusion.vision_layer{start}", self.vision_encoder.layer[start], vision, image_mask, text, text_mask
                    ),
                )
            else:
                text = self._co_attention_run(start, stop, vision, image_mask, text, text_mask)
        return vision, text

    def _co_attention_run(self, start: int, stop: int, vision, vision_mask, text, text_mask) -> torch.Tensor:
        """Text through co-attention layers [start, stop), their vision K/V from one stacked GEMM."""
        layers = list(self.encoder.layer)[start:stop]
        vision_kv = CoAttentionStack([layer.crossattention for layer in layers]).vision_kv(vision).project()
        for index, layer in enumerate(layers):
            text = self._run(f"fusion.layer{start + index}", layer, text, text_mask, None, vision_mask, vision_kv[index])
        return text

    def _run(self, range_name: str, layer: nn.Module, *args):
        """layer(*args) inside a profiler range, recomputed in the backward pass under gradient checkpointing."""
        with nvtx_range(range_name):
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                return checkpoint(layer, *args, use_reentrant=False)
            return layer(*args)


def check_fusion_inputs(image_embeds, image_mask, text_embeds, text_mask, hidden_size: int) -> None:
    """Both streams [B, L, hidden] with one batch size, dtype and device; masks bool [B, L] or None."""
    for name, x in (("image_embeds", image_embeds), ("text_embeds", text_embeds)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 3 or x.shape[2] != hidden_size or x.shape[1] == 0:
            raise ValueError(f"{name} must be [B, L, {hidden_size}] with L >= 1, got shape {tuple(x.shape)}")
    if image_embeds.shape[0] != text_embeds.shape[0]:
        raise ValueError(
            f"image_embeds has batch {image_embeds.shape[0]} but text_embeds has batch {text_embeds.shape[0]}"
        )
    if image_embeds.dtype != text_embeds.dtype or image_embeds.device != text_embeds.device:
        raise ValueError(
            f"image_embeds ({image_embeds.dtype}, {image_embeds.device}) and text_embeds "
            f"({text_embeds.dtype}, {text_embeds.device}) must share dtype and device"
        )
    for name, mask, x in (("image_mask", image_mask, image_embeds), ("text_mask", text_mask, text_embeds)):
        if mask is not None:
            check_mask(name, mask, x.shape[0], x.shape[1], x.device)
