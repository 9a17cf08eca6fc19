"""CoAttention: a drop-in BERT cross-attention block (text queries over vision keys/values).

Two ways to use the memory (``kv_strategy``):
- ``project``: K = v Wk + bk and V = v Wv + bv per layer, then fused attention (``concat_attention``).
- ``absorb``: scores (t Wq)(v Wk)^T = ((t Wq) Wk^T) v^T and P (v Wv) = (P v) Wv, so every head attends
  straight over the raw memory features v (shared by all heads, like multi-query attention with head
  dim = memory width); the key bias cancels in the softmax and the value bias passes through. It runs
  as plain PyTorch matmuls (our kernels stop at head dim 128; the memory width is 768).
- ``auto``: the cheaper of the two by the roofline estimate of ``kv_strategy_costs``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from mplug_kernels.backends.sdpa import zero_dead_rows
from mplug_kernels.reference import dead_queries_zeroed, never_empty
from mplug_kernels.ops.concat_attention import concat_attention
from mplug_kernels.ops.merge import merge_attention_states

KV_STRATEGIES = ("project", "absorb", "auto")
# Roofline constants of ``auto`` (H100 SXM: dense bf16 FLOP/s, HBM bytes/s); only their ratio matters.
PEAK_FLOPS = 989e12
PEAK_BYTES_PER_S = 3.35e12
# An additive mask value at or below this masks its key (BERT uses -10000, newer code finfo.min or -inf).
MASKED_BELOW = -1e4


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
        return keep_from_additive(mask)
    raise TypeError(f"attention mask must be bool (True = attend) or additive float (0 / -10000), got {mask.dtype}")


def keep_from_additive(mask: torch.Tensor) -> torch.Tensor:
    """Bool keep mask (True = attend) from an additive float mask: 0 = attend, <= -10000 (or -inf) = masked.

    Any other value is refused: a float 0/1 mask could mean "1 = attend" or "add 0 or 1 to the scores",
    so it is never guessed (pass such a mask as bool). An all-zero float mask is additive: nothing masked.
    """
    attend, masked = mask == 0, mask <= MASKED_BELOW
    unclear = ~(attend | masked)
    if bool(unclear.any()):
        raise ValueError(
            f"float attention mask (shape {tuple(mask.shape)}, dtype {mask.dtype}) holds {mask[unclear][0].item()!r}: a float "
            f"mask is additive (0 = attend, <= {MASKED_BELOW:g} or -inf = masked); a 0/1 keep mask (1 = attend) must be "
            f"passed as bool, e.g. mask.bool()"
        )
    return attend


def memory_masks(mask, sources: Sequence[torch.Tensor]) -> Optional[Tuple[Optional[torch.Tensor], ...]]:
    """Per-source bool masks from None, one mask over all sources (split as views) or a tuple with one per source."""
    if mask is None:
        return None
    batch, lengths = sources[0].shape[0], [source.shape[1] for source in sources]
    if isinstance(mask, (tuple, list)):
        if len(mask) != len(sources):
            raise ValueError(f"encoder_attention_mask has {len(mask)} entries but there are {len(sources)} memory sources")
        return tuple(key_padding_mask_from(m, batch, length) for m, length in zip(mask, lengths))
    keep = key_padding_mask_from(mask, batch, sum(lengths))
    return tuple(keep.split(lengths, dim=1))


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, S, H*D] -> [B, S, H, D] (a view)."""
    return x.unflatten(-1, (num_heads, x.shape[-1] // num_heads))


def kv_strategy_costs(
    batch: int, q_len: int, kv_len: int, hidden: int, num_heads: int, kv_width: int, itemsize: int, projected: bool
) -> Dict[str, float]:
    """Estimated seconds per strategy for one layer: FLOPs / PEAK_FLOPS + bytes / PEAK_BYTES_PER_S.

    project: 4*B*Lk*C*hidden FLOPs for the K/V GEMMs (0 when ``projected``, i.e. cached) plus
    4*B*Lq*Lk*hidden for attention; bytes: v read, K and V written and read back (B*Lk*(C + 4*hidden)
    elements; 2*B*Lk*hidden when cached). absorb: 4*B*H*Lq*Lk*C FLOPs for attention at head dim C plus
    4*B*Lq*hidden*C for the query and output maps; bytes: v read twice (2*B*Lk*C elements) and the
    float32 scores [B, H*Lq, Lk] written and read twice (16 bytes each).
    """
    scores = batch * num_heads * q_len * kv_len
    attention_flops = 4 * batch * q_len * kv_len * hidden
    if projected:
        project_flops, project_bytes = attention_flops, itemsize * 2 * batch * kv_len * hidden
    else:
        project_flops = 4 * batch * kv_len * kv_width * hidden + attention_flops
        project_bytes = itemsize * batch * kv_len * (kv_width + 4 * hidden)
    absorb_flops = 4 * scores * kv_width + 4 * batch * q_len * hidden * kv_width
    absorb_bytes = itemsize * 2 * batch * kv_len * kv_width + 16 * scores
    seconds = lambda flops, nbytes: flops / PEAK_FLOPS + nbytes / PEAK_BYTES_PER_S
    return {"project": seconds(project_flops, project_bytes), "absorb": seconds(absorb_flops, absorb_bytes)}


def _attend_shared_source(queries, source, keep, scale):
    """queries [B, M, C] over one key = value source [B, Lk, C] -> (out [B, M, C], lse [B, M] in float32 or float64)."""
    alive = None
    if keep is not None:
        safe_keep, alive = never_empty(keep)
        source = source.masked_fill(~keep[..., None], 0)
        queries = dead_queries_zeroed(queries, alive)
    scores = torch.matmul(queries, source.transpose(1, 2)).to(torch.promote_types(queries.dtype, torch.float32)) * scale
    if keep is not None:
        scores = scores.masked_fill(~safe_keep[:, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = zero_dead_rows(torch.matmul(torch.exp(scores - lse[..., None]).to(source.dtype), source), alive)
    if alive is not None:
        lse = lse.masked_fill(~alive[:, None], float("-inf"))
    return out, lse


def shared_key_attention(queries, sources, keeps, scale: float) -> torch.Tensor:
    """queries [B, M, C] attend to the concatenated sources [B, Lk_i, C], each both key and value for all M rows -> [B, M, C]."""
    keeps = keeps or (None,) * len(sources)
    states = [_attend_shared_source(queries, source, keep, scale) for source, keep in zip(sources, keeps)]
    if len(states) == 1:
        return states[0][0]
    out, _ = merge_attention_states(
        tuple(out.unsqueeze(2) for out, _ in states), tuple(lse.unsqueeze(1) for _, lse in states)
    )
    return out.squeeze(2)


class AttentionProjections(nn.Module):
    """BERT's ``attention.self``: query/key/value linears (key/value may read another width)."""

    def __init__(self, hidden_size: int, kv_width: Optional[int] = None):
        super().__init__()
        kv_width = kv_width or hidden_size
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(kv_width, hidden_size)
        self.value = nn.Linear(kv_width, hidden_size)


class AttentionOutput(nn.Module):
    """BERT's ``attention.output`` (and, with input_size, its FFN ``output``): dense, dropout, residual, post-LayerNorm."""

    def __init__(self, hidden_size: int, layer_norm_eps: float = 1e-12, dropout: float = 0.0, input_size: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(input_size or hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, context: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """LayerNorm(residual + dropout(dense(context))): context [B, S, input_size], residual [B, S, hidden]."""
        return self.LayerNorm(residual + self.dropout(self.dense(context)))


def _as_sources(encoder_hidden_states) -> Tuple[torch.Tensor, ...]:
    if isinstance(encoder_hidden_states, (tuple, list)):
        return tuple(encoder_hidden_states)
    if encoder_hidden_states is None:
        raise ValueError("CoAttention needs encoder_hidden_states or vision_kv")
    return (encoder_hidden_states,)


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
        kv_strategy: str = "project",
    ):
        super().__init__()
        if hidden_size % num_heads != 0:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        if kv_strategy not in KV_STRATEGIES:
            raise ValueError(f"kv_strategy must be one of {KV_STRATEGIES}, got {kv_strategy!r}")
        self.num_heads = num_heads
        self.backend = backend
        self.kv_strategy = kv_strategy
        self.self = AttentionProjections(hidden_size, kv_width)
        self.output = AttentionOutput(hidden_size, layer_norm_eps, dropout)

    def project_memory(self, sources: Sequence[torch.Tensor]):
        """(ks, vs): this layer's K and V [B, Lk_i, H, D] of every memory source [B, Lk_i, kv_width]."""
        ks = tuple(split_heads(self.self.key(source), self.num_heads) for source in sources)
        vs = tuple(split_heads(self.self.value(source), self.num_heads) for source in sources)
        return ks, vs

    def choose_kv_strategy(self, q_len: int, sources: Sequence[torch.Tensor], projected: bool = False) -> str:
        """'project' or 'absorb' for Lq queries over the memory sources (``auto`` uses kv_strategy_costs)."""
        if self.kv_strategy != "auto":
            return self.kv_strategy
        hidden, kv_width = self.self.key.out_features, self.self.key.in_features
        costs = kv_strategy_costs(
            sources[0].shape[0], q_len, sum(s.shape[1] for s in sources), hidden, self.num_heads, kv_width,
            sources[0].element_size(), projected,
        )
        return min(costs, key=costs.get)

    def absorbed_context(self, q: torch.Tensor, sources: Sequence[torch.Tensor], keeps) -> torch.Tensor:
        """Context [B, Lt, H, D] of queries q [B, Lt, H, D] attending over the raw memory features (no K/V projection)."""
        batch, q_len, heads, head_dim = q.shape
        key_weight = self.self.key.weight.view(heads, head_dim, -1)
        value_weight = self.self.value.weight.view(heads, head_dim, -1)
        absorbed_q = torch.einsum("bthd,hdc->bhtc", q, key_weight).flatten(1, 2)
        mixed = shared_key_attention(absorbed_q, sources, keeps, head_dim ** -0.5)
        context = torch.einsum("bhtc,hdc->bthd", mixed.unflatten(1, (heads, q_len)), value_weight)
        value_bias = self.self.value.bias.view(heads, head_dim)
        if keeps is None or any(keep is None for keep in keeps):
            return context + value_bias
        alive = torch.stack([keep.any(dim=1) for keep in keeps]).any(dim=0)
        return context + value_bias * alive[:, None, None, None].to(context.dtype)

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        *,
        vision_kv=None,
    ) -> torch.Tensor:
        """text [B, Lt, hidden] over vision [B, Lv, kv_width] or a tuple of memory sources (a ``vision_kv`` cache entry, when given, replaces them); mask bool/additive -> text [B, Lt, hidden]."""
        sources = vision_kv.features if vision_kv is not None else _as_sources(encoder_hidden_states)
        keeps = memory_masks(encoder_attention_mask, sources)
        q = split_heads(self.self.query(hidden_states), self.num_heads)
        projected = vision_kv is not None and vision_kv.projected
        if self.choose_kv_strategy(q.shape[1], sources, projected) == "absorb":
            context = self.absorbed_context(q, sources, keeps)
        else:
            ks, vs = vision_kv.key_values() if vision_kv is not None else self.project_memory(sources)
            context = concat_attention(q, ks, vs, keeps, backend=self.backend)
        return self.output(context.flatten(2), hidden_states)
