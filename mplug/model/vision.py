"""The CLIP ViT visual encoder (official names ``visual.*``, ``visn_fc``, ``visn_layer_norm``).

Self-attention runs through ``mplug_kernels.co_attention`` (queries, keys and values from the same
tokens, no mask) on the configured backend; the packed ``in_proj_weight`` [3w, w] is kept as is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mplug_kernels import co_attention
from mplug_kernels.nn.co_attention import split_heads

from mplug.model.config import MPLUGConfig


class PackedSelfAttention(nn.Module):
    """CLIP ``attn``: packed q/k/v projection ``in_proj_weight`` [3w, w], ``out_proj``."""

    def __init__(self, width: int, num_heads: int, backend: str):
        super().__init__()
        self.num_heads = num_heads
        self.backend = backend
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, w] -> [B, L, w]."""
        q, k, v = (split_heads(t, self.num_heads) for t in F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, -1))
        return self.out_proj(co_attention(q, k, v, backend=self.backend).flatten(2))


class QuickGELUMLP(nn.Module):
    """CLIP ``mlp``: ``c_fc`` to 4w, QuickGELU x * sigmoid(1.702 x), ``c_proj`` back to w."""

    def __init__(self, width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, w] -> [B, L, w]."""
        hidden = self.c_fc(x)
        return self.c_proj(hidden * torch.sigmoid(1.702 * hidden))


class ResidualAttentionBlock(nn.Module):
    """A pre-norm ViT block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        width, eps = config.vision_width, config.vision_layer_norm_eps
        self.attn = PackedSelfAttention(width, config.vision_heads, config.attn_backend)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = QuickGELUMLP(width)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, w] -> [B, L, w]."""
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """CLIP ``transformer.resblocks``, with optional gradient checkpointing per block."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.gradient_checkpointing = config.gradient_checkpointing
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(config) for _ in range(config.vision_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, L, w] -> [B, L, w]."""
        for block in self.resblocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x


class VisionTransformer(nn.Module):
    """CLIP ViT ``visual``: patch conv (no bias), class token, positions, ln_pre, blocks, ln_post on all tokens."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        width = config.vision_width
        self.image_size = config.image_size
        self.conv1 = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.positional_embedding = nn.Parameter(torch.randn(config.num_visual_tokens, width) * width ** -0.5)
        self.ln_pre = nn.LayerNorm(width, eps=config.vision_layer_norm_eps)
        self.transformer = Transformer(config)
        self.ln_post = nn.LayerNorm(width, eps=config.vision_layer_norm_eps)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] -> [B, 1 + (H / patch) * (W / patch), w]."""
        patches = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        x = torch.cat([cls, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        return self.ln_post(self.transformer(self.ln_pre(x)))


class VisualEncoder(nn.Module):
    """The ViT plus, when vision_width != hidden_size (large), ``visn_fc`` + ``visn_layer_norm`` + dropout to hidden."""

    def __init__(self, config: MPLUGConfig):
        super().__init__()
        self.config = config
        self.visual = VisionTransformer(config)
        self.projected = config.vision_width != config.hidden_size
        if self.projected:
            self.visn_fc = nn.Linear(config.vision_width, config.hidden_size)
            self.visn_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.dropout = nn.Dropout(config.dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, image_size, image_size] (CLIP-normalised) -> [B, Lv, hidden]."""
        check_images(images, self.config.image_size, self.visual.conv1.weight.dtype)
        x = self.visual(images)
        if self.projected:
            x = self.dropout(self.visn_layer_norm(self.visn_fc(x)))
        return x


def check_images(images, image_size: int, dtype: torch.dtype) -> None:
    """Images must be a floating [B, 3, image_size, image_size] tensor in the model's dtype."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    expected = (3, image_size, image_size)
    if images.dim() != 4 or tuple(images.shape[1:]) != expected or images.shape[0] == 0:
        raise ValueError(
            f"images must be [B, 3, {image_size}, {image_size}] (the configured image_size), got shape {tuple(images.shape)}"
        )
    if images.dtype != dtype:
        raise TypeError(f"images have dtype {images.dtype} but the model's weights are {dtype}; cast one to match")
