"""Property-based tests (hypothesis) of co_attention, concat_attention and merge_attention_states on every backend.

Random batch (0-3), lengths, heads, head dims, dtypes, masks (random, fully masked rows, all true), layouts
(transposed, sliced, batch-expanded) and NaN/inf planted in masked and unmasked positions, against a float64
oracle that reads only the kept keys. The rules: masked keys and values never influence anything; a NaN in an
unmasked input shows exactly where the oracle's does (out and lse) and nowhere else; an inf stays in its
(batch, head); finite results are within 2x (grads 3x) PyTorch's own low-precision error. Example counts come
from the hypothesis profile: "ci" (default, derandomized) or "long" (pytest --hypothesis-profile=long).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mplug_kernels
from mplug_kernels.backends import BACKENDS, AttentionCall
from attention_testing import low_precision_baseline, max_error

BACKEND_NAMES = ["reference", "sdpa", "triton", "cuda"]
# The Triton interpreter and the CUDA emulator run on the CPU: fewer and smaller examples.
SLOW_BACKENDS = ("triton", "cuda")
CANDIDATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CANDIDATE_HEAD_DIMS = (8, 16, 32, 40, 64, 80)
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded")
MASK_KINDS = ("none", "random", "all_true", "dead_rows", "all_false")
PLANTED = (float("nan"), float("inf"), float("-inf"))


def _supported(backend: str, dtype: torch.dtype, head_dim: int, lse: bool) -> bool:
    call = AttentionCall("cpu", dtype, head_dim, 1, True, True, lse)
    return not BACKENDS[backend].reasons(call)


def _skip_unless_available(backend: str) -> None:
    if not any(_supported(backend, dtype, 64, False) for dtype in CANDIDATE_DTYPES):
        reasons = BACKENDS[backend].reasons(AttentionCall("cpu", torch.float16, 64, 1, True, True, False))
        pytest.skip(f"backend {backend}: {'; '.join(reasons)}")


def _examples(backend: str) -> int:
    """This profile's example count, halved for the backends that run on a CPU emulation."""
    count = settings.default.max_examples
    return max(1, count // 2) if backend in SLOW_BACKENDS else count


@dataclass
class Case:
    """One attention call: queries, key/value sources, masks, and whether inputs were planted with non-finite values."""

    queries: Tuple[torch.Tensor, ...]
    ks: List[torch.Tensor]
    vs: List[torch.Tensor]
    masks: List[Optional[torch.Tensor]]
    planted_unmasked: bool
    planted_inf_unmasked: bool
    description: str

    def __repr__(self) -> str:
        return f"Case({self.description})"

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(repr(self))


def _mask(kind: str, batch: int, length: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    if kind == "none":
        return None
    if kind == "all_true":
        return torch.ones(batch, length, dtype=torch.bool)
    if kind == "all_false":
        return torch.zeros(batch, length, dtype=torch.bool)
    mask = torch.rand(batch, length, generator=generator) < 0.7
    if kind == "dead_rows" and batch:
        mask[torch.rand(batch, generator=generator) < 0.5] = False
    return mask


def _lay_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """values [B, S, H, D] in the memory layout named ``layout`` (same values, other strides)."""
    if layout == "transposed":
        return values.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "sliced":
        batch, length, heads, head_dim = values.shape
        big = torch.zeros(batch, length + 2, heads, 2 * head_dim, dtype=values.dtype)
        big[:, 1 : length + 1, :, ::2] = values
        return big[:, 1 : length + 1, :, ::2]
    return values


def _tensor(draw, shape, dtype, generator) -> torch.Tensor:
    """Fresh N(0, 1) values [B, S, H, D] in a drawn layout; 'expanded' shares one batch row across the batch."""
    layout = draw(st.sampled_from(LAYOUTS))
    if layout == "expanded":
        row = torch.randn(1, *shape[1:], generator=generator).to(dtype)
        return row.expand(*shape)
    return _lay_out(torch.randn(*shape, generator=generator).to(dtype), layout)


def _plant(draw, x: torch.Tensor, rows: torch.Tensor, generator) -> torch.Tensor:
    """A copy of x (in a drawn layout) with one non-finite value at a random position whose (batch, sequence) row is in
    ``rows`` [B, S]; x itself when no row is."""
    candidates = rows.nonzero()
    if not len(candidates):
        return x
    batch, position = candidates[int(torch.randint(len(candidates), (1,), generator=generator))].tolist()
    head = int(torch.randint(x.shape[2], (1,), generator=generator))
    dim = int(torch.randint(x.shape[3], (1,), generator=generator))
    planted = x.contiguous().clone()
    planted[batch, position, head, dim] = draw(st.sampled_from(PLANTED))
    return _lay_out(planted, draw(st.sampled_from(LAYOUTS[:-1])))


@st.composite
def cases(draw, backend: str, max_sources: int, lse: bool) -> Case:
    slow = backend in SLOW_BACKENDS
    dtype = draw(st.sampled_from([d for d in CANDIDATE_DTYPES if any(_supported(backend, d, h, lse) for h in CANDIDATE_HEAD_DIMS)]))
    head_dim = draw(st.sampled_from([h for h in CANDIDATE_HEAD_DIMS if _supported(backend, dtype, h, lse)]))
    batch, heads = draw(st.integers(0, 3)), draw(st.integers(1, 2 if slow else 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    q_lens = draw(st.lists(st.integers(1, 12 if slow else 40), min_size=1, max_size=2 if max_sources > 1 else 1))
    k_lens = draw(st.lists(st.integers(1, 600), min_size=1, max_size=max_sources))
    queries = [_tensor(draw, (batch, n, heads, head_dim), dtype, generator) for n in q_lens]
    ks = [_tensor(draw, (batch, n, heads, head_dim), dtype, generator) for n in k_lens]
    vs = [_tensor(draw, (batch, n, heads, head_dim), dtype, generator) for n in k_lens]
    mask_kinds = [draw(st.sampled_from(MASK_KINDS)) for _ in k_lens]
    masks = [_mask(kind, batch, n, generator) for kind, n in zip(mask_kinds, k_lens)]
    keeps = [torch.ones(batch, n, dtype=torch.bool) if m is None else m for m, n in zip(masks, k_lens)]
    alive = torch.cat(keeps, dim=1).any(dim=1) if batch else torch.zeros(0, dtype=torch.bool)
    targets = draw(st.sampled_from(["none", "masked", "unmasked", "both"]))
    planted_unmasked = planted_inf = False
    if targets in ("masked", "both"):
        source = draw(st.integers(0, len(k_lens) - 1))
        hidden = ~keeps[source] | ~alive[:, None]
        ks[source] = _plant(draw, ks[source], hidden, generator)
        vs[source] = _plant(draw, vs[source], hidden, generator)
        queries[0] = _plant(draw, queries[0], ~alive[:, None].expand(-1, q_lens[0]), generator)
    if targets in ("unmasked", "both"):
        which = draw(st.sampled_from(["q", "k", "v"]))
        source = draw(st.integers(0, len(k_lens) - 1))
        group, index, rows = {
            "q": (queries, 0, alive[:, None].expand(-1, q_lens[0])),
            "k": (ks, source, keeps[source] & alive[:, None]),
            "v": (vs, source, keeps[source] & alive[:, None]),
        }[which]
        before = group[index]
        group[index] = _plant(draw, before, rows, generator)
        planted_unmasked = group[index] is not before
        planted_inf = planted_unmasked and bool(torch.isinf(group[index]).any())
    description = (f"seed {seed}, dtype {dtype}, B={batch}, H={heads}, D={head_dim}, Lq={q_lens}, Lk={k_lens}, masks={mask_kinds}, "
                   f"planted={targets}, layouts={[tuple(x.stride()) for x in (*queries, *ks, *vs)]}")
    return Case(tuple(queries), ks, vs, masks, planted_unmasked, planted_inf, description)


def oracle(q, ks, vs, masks, scale) -> Tuple[torch.Tensor, torch.Tensor]:
    """float64 (out [B, Lq, H, D], lse [B, H, Lq]): each batch element attends over its kept keys only (0, -inf when none)."""
    k, v = torch.cat([x.double() for x in ks], dim=1), torch.cat([x.double() for x in vs], dim=1)
    keep = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool) if m is None else m for m, x in zip(masks, ks)], dim=1)
    batch, q_len, heads, head_dim = q.shape
    outs = [q.new_zeros((0, q_len, heads, head_dim), dtype=torch.float64)]
    lses = [q.new_zeros((0, heads, q_len), dtype=torch.float64)]
    for b in range(batch):
        kept = keep[b].nonzero().squeeze(1)
        if not len(kept):
            outs.append(q.new_zeros((1, q_len, heads, head_dim), dtype=torch.float64))
            lses.append(torch.full((1, heads, q_len), float("-inf"), dtype=torch.float64))
            continue
        scores = torch.einsum("qhd,khd->hqk", q[b].double(), k[b, kept]) * scale
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v[b, kept])[None])
        lses.append(torch.logsumexp(scores, dim=-1)[None])
    return torch.cat(outs), torch.cat(lses)


def _sanitized(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x.detach(), nan=0.0, posinf=0.0, neginf=0.0).requires_grad_(x.requires_grad)


def _touched(q, ks, vs, masks) -> torch.Tensor:
    """bool [B, H]: the (batch, head) slices that read a non-finite unmasked input."""
    touched = (~torch.isfinite(q)).any(dim=(1, 3))
    for k, v, m in zip(ks, vs, masks):
        bad = (~torch.isfinite(k) | ~torch.isfinite(v)).any(dim=3)
        if m is not None:
            bad = bad & m[:, :, None]
        touched = touched | bad.any(dim=1)
    return touched


def _check_values(name: str, ours, ref, baseline, factor: float, slack: float, excluded=None) -> None:
    """NaN exactly where ref has NaN (outside ``excluded``) and |ours - ref| <= factor * |baseline - ref| + slack where ref is finite."""
    ours, ref, baseline = ours.detach().double(), ref.detach().double(), baseline.detach().double()
    compared = torch.ones_like(ref, dtype=torch.bool) if excluded is None else ~excluded
    nan_differs = ((torch.isnan(ours) != torch.isnan(ref)) & compared).nonzero()
    assert not len(nan_differs), f"{name}: NaN differs from the float64 oracle at {nan_differs[:4].tolist()} (of {len(nan_differs)})"
    finite = torch.isfinite(ref) & compared
    error = max_error(ours[finite], ref[finite]) if finite.any() else 0.0
    budget = max_error(baseline[finite], ref[finite]) if finite.any() else 0.0
    assert error <= factor * budget + slack, f"{name}: error {error:.3e} > {factor} x low-precision error {budget:.3e} + {slack}"
    infinite = torch.isinf(ref) & compared
    same_infinities = torch.equal(ours[infinite], ref[infinite])
    assert same_infinities, f"{name}: infinities differ from the float64 oracle"


def _attend(api: str, backend: str, case: Case, lse: bool):
    """[(out, lse or None)] per query of the case, through co_attention or concat_attention."""
    if api == "co":
        result = mplug_kernels.co_attention(case.queries[0], case.ks[0], case.vs[0], case.masks[0], return_lse=lse, backend=backend)
        return [result if lse else (result, None)]
    result = mplug_kernels.concat_attention(case.queries, case.ks, case.vs, case.masks, return_lse=lse, backend=backend)
    return list(zip(*result)) if lse else [(out, None) for out in result]


def _split_inputs(case: Case, inputs):
    """(queries, ks, vs) from the flat list [*queries, *ks, *vs] of a case's shapes."""
    num_q, num_k = len(case.queries), len(case.ks)
    return tuple(inputs[:num_q]), list(inputs[num_q : num_q + num_k]), list(inputs[num_q + num_k :])


def _check_case(api: str, backend: str, drawn: Case) -> None:
    lse_supported = BACKENDS[backend].supports_lse
    originals = [x.clone() for x in (*drawn.queries, *drawn.ks, *drawn.vs)]
    inputs = [x.detach().requires_grad_() for x in (*drawn.queries, *drawn.ks, *drawn.vs)]
    case = replace(drawn, **dict(zip(("queries", "ks", "vs"), _split_inputs(drawn, inputs))))
    scale = case.queries[0].shape[-1] ** -0.5
    results = _attend(api, backend, case, lse_supported)
    check_grads = not case.planted_unmasked and case.queries[0].shape[0] > 0
    outputs = []
    for q, (out, lse) in zip(case.queries, results):
        assert out.shape == q.shape and out.dtype == q.dtype
        ref_out, ref_lse = oracle(q, case.ks, case.vs, case.masks, scale)
        base_out, base_lse = low_precision_baseline(_sanitized(q), [_sanitized(k) for k in case.ks],
                                                    [_sanitized(v) for v in case.vs], case.masks, scale)
        touched = _touched(q, case.ks, case.vs, case.masks) if case.planted_inf_unmasked else None
        excluded_out = None if touched is None else touched[:, None, :, None].expand(q.shape)
        _check_values("out", out, ref_out, base_out, 2, 1e-5, excluded_out)
        if lse is not None:
            assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
            _check_values("lse", lse, ref_lse, base_lse, 2, 1e-4, None if touched is None else touched[:, :, None].expand(lse.shape))
        outputs.append(out)
    unchanged = all(torch.equal(x.detach().nan_to_num(1.0), y.nan_to_num(1.0)) for x, y in zip(inputs, originals))
    assert unchanged, "an input was modified"
    if check_grads:
        _check_grads(case, outputs, scale)


def _grads(outputs, seeds, inputs) -> List[torch.Tensor]:
    """Gradients of sum(output * seed) in float64 with respect to inputs (zeros where nothing depends on them)."""
    loss = sum((o.double() * s.double()).sum() for o, s in zip(outputs, seeds))
    if not loss.requires_grad:
        return [torch.zeros_like(x, dtype=torch.float64) for x in inputs]
    return list(torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True))


def _check_grads(case: Case, outputs, scale) -> None:
    """dq, dk, dv through every query's output against the oracle's, within 3x PyTorch's low-precision error."""
    inputs = [*case.queries, *case.ks, *case.vs]
    generator = torch.Generator().manual_seed(7)
    seeds = [torch.randn(out.shape, generator=generator).to(out.dtype) for out in outputs]
    ours = _grads(outputs, seeds, inputs)
    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    q64, ks64, vs64 = _split_inputs(case, leaves64)
    expected = _grads([oracle(q, ks64, vs64, case.masks, scale)[0] for q in q64], seeds, leaves64)
    clean = [_sanitized(x) for x in inputs]
    cq, cks, cvs = _split_inputs(case, clean)
    baseline = _grads([low_precision_baseline(q, cks, cvs, case.masks, scale)[0] for q in cq], seeds, clean)
    names = [f"{grad}[{i}]" for grad, group in zip(("dq", "dk", "dv"), (case.queries, case.ks, case.vs)) for i in range(len(group))]
    for name, g, g_ref, g_base in zip(names, ours, expected, baseline):
        _check_values(name, g, g_ref, g_base, 3, 1e-4)


def _check_merge(backend: str, drawn: Case) -> None:
    """Each source attended on its own (backend, with lse), laid out strided, merged: the attention over all sources.

    A part with no key for a row (lse -inf) gets NaN written into its out there, which the merge must ignore.
    """
    inputs = [x.detach().requires_grad_() for x in (*drawn.queries[:1], *drawn.ks, *drawn.vs)]
    case = replace(drawn, queries=tuple(inputs[:1]), ks=inputs[1 : 1 + len(drawn.ks)], vs=inputs[1 + len(drawn.ks) :])
    q, scale = case.queries[0], case.queries[0].shape[-1] ** -0.5
    parts = [mplug_kernels.co_attention(q, k, v, m, return_lse=True, backend=backend) for k, v, m in zip(case.ks, case.vs, case.masks)]
    outs = [_lay_out(out.masked_fill(torch.isneginf(lse).transpose(1, 2)[..., None], float("nan")), layout)
            for (out, lse), layout in zip(parts, LAYOUTS[1:] * 2)]
    out, lse = mplug_kernels.merge_attention_states(outs, [lse for _, lse in parts])
    ref_out, ref_lse = oracle(q, case.ks, case.vs, case.masks, scale)
    base_out, base_lse = low_precision_baseline(_sanitized(q), [_sanitized(k) for k in case.ks],
                                                [_sanitized(v) for v in case.vs], case.masks, scale)
    touched = _touched(q, case.ks, case.vs, case.masks) if case.planted_inf_unmasked else None
    _check_values("merged out", out, ref_out, base_out, 2, 1e-5, None if touched is None else touched[:, None, :, None].expand(q.shape))
    _check_values("merged lse", lse, ref_lse, base_lse, 2, 1e-4, None if touched is None else touched[:, :, None].expand(lse.shape))
    if not case.planted_unmasked and q.shape[0] > 0:
        _check_grads(case, [out], scale)


def _run(check, backend: str, strategy) -> None:
    @settings(max_examples=_examples(backend), deadline=None)
    @given(case=strategy)
    def run(case):
        check(case)

    run()


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_co_attention_properties(backend):
    _skip_unless_available(backend)
    _run(lambda case: _check_case("co", backend, case), backend, cases(backend, 1, BACKENDS[backend].supports_lse))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_concat_attention_properties(backend):
    _skip_unless_available(backend)
    _run(lambda case: _check_case("concat", backend, case), backend, cases(backend, 4, BACKENDS[backend].supports_lse))


@pytest.mark.parametrize("backend", [name for name in BACKEND_NAMES if BACKENDS[name].supports_lse])
def test_merge_attention_states_properties(backend):
    _skip_unless_available(backend)
    _run(lambda case: _check_merge(backend, case), backend, cases(backend, 4, True))
