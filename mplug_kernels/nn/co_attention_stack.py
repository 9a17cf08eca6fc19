"""CoAttentionStack: the co-attention layers between two connected layers share one vision K/V GEMM.

Between connected layers the vision features do not change, so the K/V projections of every layer
in the run are computed at once with the layers' key/value weights side by side (one wide GEMM per
memory source) and cached: several questions about one image and every decoder step reuse them.
The parameters stay in the CoAttention modules (checkpoint names untouched); the stack only
references them.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from mplug_kernels.nn.co_attention import CoAttention

KeyValues = Tuple[Tuple[torch.Tensor, ...], Tuple[torch.Tensor, ...]]


def project_stack(layers: Sequence[CoAttention], sources: Sequence[torch.Tensor]) -> List[KeyValues]:
    """Per layer (ks, vs) [B, Lk_i, H, D] of each memory source [B, Lk_i, kv_width], one GEMM per source (views of its output)."""
    weight = torch.cat([w for layer in layers for w in (layer.self.key.weight, layer.self.value.weight)])
    bias = torch.cat([b for layer in layers for b in (layer.self.key.bias, layer.self.value.bias)])
    heads = layers[0].num_heads
    per_source = [F.linear(source, weight, bias).unflatten(-1, (len(layers), 2, heads, -1)).unbind(2) for source in sources]
    per_layer = []
    for index in range(len(layers)):
        pairs = [source_layers[index].unbind(2) for source_layers in per_source]
        per_layer.append((tuple(k for k, _ in pairs), tuple(v for _, v in pairs)))
    return per_layer


class LayerVisionKV:
    """One layer's entry of a VisionKVCache: what CoAttention.forward(vision_kv=...) reads."""

    def __init__(self, cache: "VisionKVCache", index: int):
        self.cache = cache
        self.index = index

    @property
    def features(self) -> Tuple[torch.Tensor, ...]:
        """The raw memory sources [B, Lk_i, kv_width] (what the absorbed strategy attends over)."""
        return self.cache.features

    @property
    def projected(self) -> bool:
        """True once the stack's K/V exist (then using them costs no projection)."""
        return self.cache.projected

    def key_values(self) -> KeyValues:
        """This layer's (ks, vs) [B, Lk_i, H, D], projecting the whole stack on first use."""
        return self.cache.key_values(self.index)


class VisionKVCache:
    """Memory features of one batch of images for a stack, and every layer's K/V once any layer needs them."""

    def __init__(self, layers: Sequence[CoAttention], features: Tuple[torch.Tensor, ...]):
        self.layers = tuple(layers)
        self.features = features
        self._key_values: Optional[List[KeyValues]] = None

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, index: int) -> LayerVisionKV:
        if not -len(self) <= index < len(self):
            raise IndexError(f"layer index {index} out of range for a stack of {len(self)} layers")
        return LayerVisionKV(self, index % len(self))

    @property
    def projected(self) -> bool:
        return self._key_values is not None

    def project(self) -> "VisionKVCache":
        """Compute every layer's K/V now (one wide GEMM per source), e.g. before a decoding loop; returns self."""
        if self._key_values is None:
            self._key_values = project_stack(self.layers, self.features)
        return self

    def key_values(self, index: int) -> KeyValues:
        """Layer ``index``'s (ks, vs) [B, Lk_i, H, D]."""
        return self.project()._key_values[index]

    def select_rows(self, rows: torch.Tensor) -> "VisionKVCache":
        """A cache holding batch rows ``rows`` (long [N]) of the features and of any K/V already projected."""
        pick = lambda xs: tuple(x.index_select(0, rows) for x in xs)
        selected = VisionKVCache(self.layers, pick(self.features))
        if self._key_values is not None:
            selected._key_values = [(pick(ks), pick(vs)) for ks, vs in self._key_values]
        return selected


def _memory_layout(layer: CoAttention) -> Tuple[int, int, int]:
    return layer.num_heads, layer.self.key.in_features, layer.self.key.out_features


class CoAttentionStack:
    """A run of CoAttention layers over the same memory: ``cache = stack.vision_kv(vision)``, then ``layers[i](text, vision_kv=cache[i])``."""

    def __init__(self, layers: Sequence[CoAttention]):
        layers = tuple(layers)
        if not layers:
            raise ValueError("CoAttentionStack needs at least one CoAttention layer")
        for i, layer in enumerate(layers):
            if not isinstance(layer, CoAttention):
                raise TypeError(f"layers[{i}] must be a CoAttention, got {type(layer).__name__}")
        first = _memory_layout(layers[0])
        for i, layer in enumerate(layers):
            shape = _memory_layout(layer)
            if shape != first:
                raise ValueError(
                    f"layers[{i}] has (heads, kv_width, hidden) = {shape} but layers[0] has {first}; a stack shares one memory layout"
                )
        self.layers = layers

    def __len__(self) -> int:
        return len(self.layers)

    def vision_kv(self, *features: torch.Tensor) -> VisionKVCache:
        """A cache over memory sources [B, Lk_i, kv_width] (vision, or vision and text for a decoder); K/V are projected on first use."""
        if not features:
            raise ValueError("vision_kv needs at least one memory source [B, Lk, kv_width]")
        kv_width = self.layers[0].self.key.in_features
        for i, source in enumerate(features):
            if not isinstance(source, torch.Tensor) or source.dim() != 3 or source.shape[-1] != kv_width:
                described = tuple(source.shape) if isinstance(source, torch.Tensor) else type(source).__name__
                raise ValueError(f"features[{i}] must be a tensor [B, Lk, kv_width={kv_width}], got {described}")
        return VisionKVCache(self.layers, features)
