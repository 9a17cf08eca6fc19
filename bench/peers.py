"""Peer attention implementations as benchmark runners, each labelled with what it had to do to run our problem.

A problem is q [B, Lq, Hq, D] over key/value sources [B, Lk_i, Hkv, D] under a ``Visibility`` (padding masks and
optional key/query positions, as in ``concat_attention``). Setup that depends only on the visibility (block masks,
dense masks, sequence lengths, compilation) is done once per shape, outside the timed call; what each peer must do
per call (torch.cat, unpadding, repeat_kv) is inside it and named in its label. A peer that cannot express the
problem is skipped with the reason. flash-attn and xformers are imported lazily and run on a GPU only.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from bench.bench_co_attention import SDPA_KERNELS, Runner
from mplug_kernels.reference import joined_keep, joined_positions, visible_keys


@dataclass
class LabelledRunner(Runner):
    """A Runner (attend(q, ks, vs) -> out [B, Lq, Hq, D]) with a label of what it had to do."""

    label: str = ""


@dataclass(frozen=True)
class Visibility:
    """Key j is seen by query t iff keep[b, j] (None: all kept) and key_positions[b, j] <= query_positions[b, t]."""

    keep: Optional[torch.Tensor]
    key_positions: Optional[torch.Tensor]
    query_positions: Optional[torch.Tensor]

    @classmethod
    def of(cls, ks: Sequence[torch.Tensor], masks, key_positions=None, query_positions=None) -> "Visibility":
        """The visibility of concat_attention's arguments (masks and key_positions: one entry or None per source)."""
        return cls(joined_keep(ks, masks), joined_positions(ks, key_positions), query_positions)


@dataclass(frozen=True)
class Problem:
    """One shape's facts a peer needs: batch, query length, total keys, query and K/V heads, and the visibility."""

    batch: int
    q_len: int
    k_len: int
    q_heads: int
    kv_heads: int
    visibility: Visibility
    device: torch.device

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    def kept(self) -> torch.Tensor:
        """bool [B, Lk]: the padding keep mask, all True when nothing is padded."""
        keep = self.visibility.keep
        return keep if keep is not None else torch.ones(self.batch, self.k_len, dtype=torch.bool, device=self.device)

    def dense_mask(self) -> Optional[torch.Tensor]:
        """bool [B, 1, Lq or 1, Lk]: which keys each query sees (None when it sees them all)."""
        vis = self.visibility
        if vis.keep is None and vis.key_positions is None:
            return None
        return visible_keys(self.kept(), vis.key_positions, vis.query_positions)[:, None]


class Skip(Exception):
    """A peer cannot run this problem (the message says why)."""


def _joined(ks: Sequence[torch.Tensor], vs: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    return torch.cat(list(ks), dim=1), torch.cat(list(vs), dim=1)


def _reported(attend: Callable) -> Callable:
    """attend with any failure of a third-party library raised as RuntimeError, so the benchmark records an error row."""

    def run(q, ks, vs):
        try:
            return attend(q, ks, vs)
        except RuntimeError:
            raise
        except Exception as error:
            raise RuntimeError(f"{type(error).__name__}: {error}") from error

    return run


def flex_runner(problem: Problem, compiled: bool) -> LabelledRunner:
    """FlexAttention, BlockMask (padding + positions) once per shape; compiled per shape after a dynamo reset, or eager."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    vis, keep, device = problem.visibility, problem.kept(), problem.device

    def mask_mod(b, h, q_idx, kv_idx):
        visible = keep[b, kv_idx]
        if vis.key_positions is not None:
            visible = visible & (vis.key_positions[b, kv_idx] <= vis.query_positions[b, q_idx])
        return visible

    block_mask = create_block_mask(mask_mod, problem.batch, None, problem.q_len, problem.k_len, device=device)
    if compiled:
        torch._dynamo.reset()
    flex = torch.compile(flex_attention, dynamic=False) if compiled else flex_attention

    def attend(q, ks, vs):
        if device.type == "cpu" and torch.is_grad_enabled() and q.requires_grad:
            # refused before the call: a failed compile in grad mode leaves later calls on eager flex
            raise RuntimeError("FlexAttention has no backward on the CPU")
        k, v = _joined(ks, vs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eager flex warns that it is unfused: the label says so
            out = flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                       enable_gqa=problem.group > 1)
        return out.transpose(1, 2)

    how = "torch.compile once per shape (untimed)" if compiled else "eager, not compiled (unfused: materializes the scores)"
    label = f"FlexAttention: torch.cat; BlockMask once per shape (untimed); {how}; enable_gqa"
    return LabelledRunner("flex", attend, label=label)


def _lazy(module: str):
    """The module, imported on a GPU machine only; Skip with the reason otherwise."""
    import importlib

    if not torch.cuda.is_available():
        raise Skip("GPU only")
    try:
        return importlib.import_module(module)
    except Exception as error:  # an installed-but-broken wheel raises more than ImportError
        raise Skip(f"{module} not importable ({type(error).__name__}: {error})") from error


def _padding_only(problem: Problem, library: str) -> None:
    if problem.visibility.key_positions is not None:
        raise Skip(f"positional visibility (keys seen from a query position on): {library} has padding/causal masks only")


def flash_attn_runner(problem: Problem) -> LabelledRunner:
    """flash-attn: flash_attn_varlen_func on unpadded keys when keys are padded, flash_attn_func when nothing is."""
    _padding_only(problem, "flash-attn")
    flash_attn = _lazy("flash_attn")
    batch, q_len, keep = problem.batch, problem.q_len, problem.visibility.keep
    if keep is None:
        attend = lambda q, ks, vs: flash_attn.flash_attn_func(q, *_joined(ks, vs))
        return LabelledRunner("flash_attn", _reported(attend), label="flash_attn_func: torch.cat; no mask")
    index = keep.flatten().nonzero().squeeze(1)
    lengths = keep.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(batch + 1, dtype=torch.int32, device=problem.device) * q_len
    max_k = int(lengths.max())

    def attend(q, ks, vs):
        k, v = (x.flatten(0, 1).index_select(0, index) for x in _joined(ks, vs))
        out = flash_attn.flash_attn_varlen_func(q.flatten(0, 1), k, v, cu_q, cu_k, q_len, max_k)
        return out.view(batch, q_len, *out.shape[1:])

    label = "flash_attn_varlen_func: torch.cat + unpad keys (index_select) per call; lengths once per shape"
    return LabelledRunner("flash_attn", _reported(attend), label=label)


def _padded_keys_mask(problem: Problem):
    """xformers' BlockDiagonalPaddedKeysMask of the kept lengths (each row's kept keys must be a prefix)."""
    keep = problem.visibility.keep
    lengths = keep.sum(dim=1)
    if not torch.equal(torch.arange(keep.shape[1], device=keep.device)[None] < lengths[:, None], keep):
        raise Skip("kept keys are not a prefix of each row: a padded-keys mask cannot express it")
    attn_bias = _lazy("xformers.ops.fmha.attn_bias")
    try:
        return attn_bias.BlockDiagonalPaddedKeysMask.from_seqlens(
            q_seqlen=[problem.q_len] * problem.batch, kv_padding=problem.k_len, kv_seqlen=lengths.tolist())
    except Exception as error:  # an xformers without this mask or with another signature
        raise Skip(f"xformers padded-keys mask not built ({type(error).__name__}: {error})") from error


def xformers_runner(problem: Problem) -> LabelledRunner:
    """xformers memory_efficient_attention, padded-keys mask; grouped heads as BMGHK views (K/V expanded, not copied)."""
    _padding_only(problem, "xformers")
    xops = _lazy("xformers.ops")
    p = problem
    bias = _padded_keys_mask(p) if p.visibility.keep is not None else None
    rows = 1 if bias is not None else p.batch

    def grouped(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(rows, -1, p.kv_heads, 1, x.shape[-1]).expand(-1, -1, -1, p.group, -1)

    def attend(q, ks, vs):
        k, v = _joined(ks, vs)
        grouped_q = q.reshape(rows, -1, p.kv_heads, p.group, q.shape[-1])
        return xops.memory_efficient_attention(grouped_q, grouped(k), grouped(v), attn_bias=bias).reshape(q.shape)

    what = "padded-keys mask (kept lengths once per shape)" if bias is not None else "no mask"
    return LabelledRunner("xformers", _reported(attend), label=f"xformers memory_efficient_attention: torch.cat; {what}")


def repeat_kv(x: torch.Tensor, group: int) -> torch.Tensor:
    """[B, L, Hkv, D] -> [B, L, Hkv * group, D], each K/V head copied group times (as Hugging Face's repeat_kv)."""
    if group == 1:
        return x
    batch, length, heads, dim = x.shape
    return x[:, :, :, None].expand(batch, length, heads, group, dim).reshape(batch, length, heads * group, dim)


def sdpa_dense_runners(problem: Problem) -> List[LabelledRunner]:
    """SDPA, dense bool mask once per shape, K/V copied by repeat_kv; on a GPU one runner per SDPA kernel (cuDNN too)."""
    mask = problem.dense_mask()

    def attend(q, ks, vs):
        k, v = (repeat_kv(x, problem.group) for x in _joined(ks, vs))
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                              attn_mask=mask).transpose(1, 2)

    mask_text = "no mask" if mask is None else "dense bool mask [B, 1, Lq, Lk] once per shape (untimed)"
    label = f"SDPA: torch.cat + repeat_kv (copies) per call; {mask_text}"
    if problem.device.type != "cuda":
        return [LabelledRunner("sdpa_dense", attend, label=label)]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return [LabelledRunner(f"sdpa_dense[{kernel}]", attend, lambda m=member: sdpa_kernel(getattr(SDPBackend, m)),
                           label=f"{label}; {kernel} kernel only")
            for kernel, member in SDPA_KERNELS.items()]


def peer_runners(problem: Problem, compile_flex: bool) -> Tuple[List[LabelledRunner], Dict[str, str]]:
    """(every peer that can run problem, {peer: why not} for the others)."""
    builders = {"flex": lambda: [flex_runner(problem, compile_flex)], "flash_attn": lambda: [flash_attn_runner(problem)],
                "xformers": lambda: [xformers_runner(problem)], "sdpa_dense": lambda: sdpa_dense_runners(problem)}
    runners, skipped = [], {}
    for name, build in builders.items():
        try:
            runners += build()
        except Skip as reason:
            skipped[name] = str(reason)
    return runners, skipped
