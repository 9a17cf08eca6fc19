"""What a backend is: its declared support, its rank for ``auto`` and how it attends."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Sequence, Tuple

import torch


class Positions(NamedTuple):
    """Positional visibility: key j of source i is visible to query t of batch row b iff
    keys[i][b, j] <= queries[b, t] (keys: int32 [B, Lk_i] or None = visible to every query, per source;
    queries: int32 [B, Lq])."""

    keys: Tuple[Optional[torch.Tensor], ...]
    queries: torch.Tensor


@dataclass(frozen=True)
class AttentionCall:
    """The facts about one attention call that decide which backends can run it."""

    device_type: str
    dtype: torch.dtype
    head_dim: int
    num_sources: int
    has_mask: bool
    needs_grad: bool
    return_lse: bool
    kv_group: int = 1  # query heads per K/V head (Hq // Hkv): 1 unless K/V heads are grouped
    has_positions: bool = False  # key/query positions decide visibility (Positions)

    @classmethod
    def of(cls, q: torch.Tensor, ks, vs, masks, return_lse: bool, positions: Optional[Positions] = None) -> "AttentionCall":
        """Describe q attending to the sources ks/vs under masks (and positions, or None)."""
        tensors = [q, *ks, *vs]
        return cls(
            device_type=q.device.type,
            dtype=q.dtype,
            head_dim=q.shape[-1],
            num_sources=len(ks),
            has_mask=any(m is not None for m in masks),
            needs_grad=torch.is_grad_enabled() and any(t.requires_grad for t in tensors),
            return_lse=return_lse,
            kv_group=q.shape[2] // ks[0].shape[2] if len(ks) else 1,
            has_positions=positions is not None,
        )

    def describe(self) -> str:
        return (
            f"a call on {self.device_type} with dtype {self.dtype}, head dim {self.head_dim}, "
            f"{self.num_sources} key source(s), mask={self.has_mask}, grad={self.needs_grad}, lse={self.return_lse}, "
            f"{self.kv_group} query heads per K/V head, positions={self.has_positions}"
        )


@torch.compiler.assume_constant_result
def resolved_unavailable_reason(backend: "Backend") -> Optional[str]:
    """backend.unavailable_reason() resolved once per backend; torch.compile runs this eagerly and keeps a constant."""
    if "_resolved_unavailable_reason" not in backend.__dict__:
        backend.__dict__["_resolved_unavailable_reason"] = backend.unavailable_reason()
    return backend.__dict__["_resolved_unavailable_reason"]


class Backend:
    """Base class: subclasses set ``name`` and extend ``reasons``.

    Kernel backends (``uses_custom_op = True``) implement ``forward`` and ``backward``; the custom
    op ``mplug_kernels::attention_forward`` (mplug_kernels.ops.attention) calls them, so autograd and
    torch.compile see one op. The others (``uses_custom_op = False``) implement ``attend``.
    """

    name = "base"
    dtypes: Tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)
    devices: Tuple[str, ...] = ("cuda",)
    head_dims: Optional[Tuple[int, ...]] = None
    max_sources = 4
    supports_lse = True
    supports_grad = True
    supports_mask = True
    supports_grouped_heads = False  # k/v [B, Lk, Hkv, D] with Hkv < Hq (dividing it)
    supports_positions = False  # positional visibility (Positions)
    uses_custom_op = True

    def unavailable_reason(self) -> Optional[str]:
        """Why this backend cannot run at all on this machine, or None."""
        return None

    def reasons(self, call: AttentionCall) -> List[str]:
        """Every reason this backend cannot run ``call`` (empty when it can)."""
        unavailable = resolved_unavailable_reason(self)
        if unavailable:
            return [unavailable]
        found = []
        if call.device_type not in self.devices:
            found.append(f"device {call.device_type} not in {list(self.devices)}")
        if call.dtype not in self.dtypes:
            found.append(f"dtype {call.dtype} not in {[str(d) for d in self.dtypes]}")
        if self.head_dims is not None and call.head_dim not in self.head_dims:
            found.append(f"head dim {call.head_dim} not in {list(self.head_dims)}")
        if call.num_sources > self.max_sources:
            found.append(f"{call.num_sources} key sources > {self.max_sources}")
        if call.return_lse and not self.supports_lse:
            found.append("cannot return lse")
        if call.needs_grad and not self.supports_grad:
            found.append("has no backward")
        if call.has_mask and not self.supports_mask:
            found.append("takes no key padding mask")
        if call.kv_group > 1 and not self.supports_grouped_heads:
            found.append(f"takes no grouped K/V heads ({call.kv_group} query heads per K/V head)")
        if call.has_positions and not self.supports_positions:
            found.append("takes no key/query positions")
        return found

    def rank(self, call: AttentionCall) -> int:
        """Lower is preferred by ``auto``."""
        return 100

    def attend(self, q, ks, vs, masks, scale: float, positions: Optional[Positions] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Backends without the custom op: out [B, Lq, H, D] and lse [B, H, Lq] (or None) with autograd."""
        raise NotImplementedError(
            f"backend {self.name} runs through the custom op: mplug_kernels.ops.attention.attention_op"
        )

    def forward(self, q, ks: Sequence[torch.Tensor], vs, masks, scale: float, positions: Optional[Positions] = None):
        """Kernel backends: (out, lse float32) without autograd."""
        raise NotImplementedError(f"backend {self.name} has no kernel forward")

    def backward(self, dout, dlse, q, ks, vs, masks, out, lse, scale: float, deterministic: bool,
                 positions: Optional[Positions] = None):
        """Kernel backends: (dq, dks, dvs)."""
        raise NotImplementedError(f"backend {self.name} has no kernel backward")
