"""CoAttention: a drop-in BERT cross-attention block (text queries over vision keys/values)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mplug_kernels.ops.co_attention import co_attention


def key_padding_mask_from(mask: Optional[torch.Tensor], batch: int, length: int) -> Optional[torch.Tensor]:
    """A bool [B, Lk] mask (True = attend) from a bool mask or BERT's additive mask ([B, Lk] or [B, 1, 1, Lk], 0 / -10000)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention mask must be a tensor or None, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1:
        mask = mask[:, 0, 0, :]
    if tuple(mask.shape) != (batch, length):
        raise ValueError(
            f"attention mask must be [B, Lk] = ({batch}, {length}) or [B, 1, 1, Lk], got {tuple(mask.shape)}"
        )
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        return mask > -1.0
    raise TypeError(f"attention mask must be bool (True = attend) or additive float (0 / -10000), got {mask.dtype}")


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, S, H, D] (a view)."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))


class AttentionProjections(nn.Module):
    """BERT's ``attention.self``: query/key/value linears (key/value may read another width)."""

    def __init__(self, hidden_size: int, kv_width: Optional[int] = None):
        super().__init__()
        kv_width = kv_width or hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)


class AttentionOutput(nn.Module):
    """BERT's ``attention.output``: dense, dropout, residual, post-LayerNorm."""

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-12, dropout: float = 0.0):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(residual + dropout(dense(context))), all [B, S, hidden]."""
        return self.LayerNorm(residual + self.dropout(self.dense(context)))


class CoAttention(nn.Module):
    """Post-LN cross-attention: text [B, Lt, hidden] attends to vision [B, Lv, kv_width]; BERT names."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        kv_width: Optional[int] = None,
        *,
        layer_norm_eps: float = 1e-12,
        dropout: float = 0.0,
        backend: str = "auto",
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.backend = backend
        self.self = AttentionProjections(hidden_size, kv_width)
        self.output = AttentionOutput(hidden_size, layer_norm_eps, dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """text [B, Lt, hidden], vision [B, Lv, kv_width], mask bool/additive over Lv -> text [B, Lt, hidden]."""
        batch, length = encoder_hidden_states.shape[:2]
        keep = key_padding_mask_from(encoder_attention_mask, batch, length)
        q = split_heads(self.self.query(hidden_states), self.num_heads)
        k = split_heads(self.self.key(encoder_hidden_states), self.num_heads)
        v = split_heads(self.self.value(encoder_hidden_states), self.num_heads)
        context = co_attention(q, k, v, keep, backend=self.backend).flatten(2)
        return self.output(context, hidden_states)
