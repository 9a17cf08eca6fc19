"""The Triton backend's rules: autotuning candidates pruned per arch from compiled metadata; one real
ahead-of-time compile for sm_80 (no GPU needed) read back by bench/static_triton.py; empty batches and NaN
in masked keys/values (issue 16 items 3 and 11) under the interpreter."""
import tempfile

import pytest
import torch
import triton

import mplug_kernels
from attention_testing import reference64, skip_unless_supported
from bench import static_triton
from mplug_kernels.backends.kernel_inputs import force_num_splits
from mplug_kernels.occupancy import SM_LIMITS
from mplug_kernels.ops import triton_launch
from mplug_kernels.ops.triton_launch import KernelFacts, prune_configs

SMALL = triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2)
SPILLS = triton.Config({"BLOCK_N": 64}, num_warps=4, num_stages=2)
BIG_SHARED = triton.Config({"BLOCK_N": 128}, num_warps=8, num_stages=2)
HAND_MADE = {
    SMALL: KernelFacts(registers=128, spill_bytes=0, shared_bytes=40_000, threads=128),
    SPILLS: KernelFacts(registers=255, spill_bytes=8, shared_bytes=40_000, threads=128),
    BIG_SHARED: KernelFacts(registers=168, spill_bytes=0, shared_bytes=200_000, threads=256),  # > 163 KB, < 227 KB
}


def test_prune_drops_spills_and_what_does_not_fit_per_arch():
    configs = [SMALL, SPILLS, BIG_SHARED]
    assert prune_configs(configs, HAND_MADE.get, SM_LIMITS[80]) == [SMALL]
    assert prune_configs(configs, HAND_MADE.get, SM_LIMITS[90]) == [SMALL, BIG_SHARED]


def test_prune_refuses_to_leave_nothing():
    with pytest.raises(RuntimeError, match="spills or exceeds shared memory"):
        prune_configs([SPILLS, BIG_SHARED], HAND_MADE.get, SM_LIMITS[80])


def test_forward_candidates_per_element_size():
    for element_bytes in (2, 4):
        candidates = triton_launch.forward_candidates(element_bytes)
        assert candidates and all(config in triton_launch.FORWARD_CONFIGS for config in candidates)
    assert triton_launch.forward_candidates(2) != triton_launch.forward_candidates(4)


@pytest.mark.skipif(static_triton.aot_unavailable_reason() is not None,
                    reason=str(static_triton.aot_unavailable_reason()))
def test_ahead_of_time_compile_reads_metadata_and_sass():
    """The deterministic dQ kernel (fp16, D = 32, Lq = 25) compiled for sm_80 in a process without the
    interpreter: registers and shared memory come from ptxas and the launch, the hot loop from the SASS."""
    with tempfile.TemporaryDirectory() as cache_dir, static_triton.compile_pool(1, cache_dir) as pool:
        rows, pruned = pool.submit(static_triton.launch_rows, "float16", 32, 25, 80, ("dq",)).result()
    assert pruned == 0 and len(rows) == 1
    row = rows[0]
    identity = (row["kernel"], row["backend"], row["arch"], row["dtype"], row["head_dim"])
    assert identity == ("dq", "triton", 80, "float16", 32)
    assert "BLOCK_M=32" in row["config"] and "BLOCK_D=32" in row["config"]
    assert 16 <= row["registers"] <= 255 and row["spill_bytes"] == 0 and row["local_bytes"] == 0
    assert 0 < row["shared_bytes"] <= SM_LIMITS[80].max_shared_per_cta
    assert row["ctas_per_sm"] >= 1 and row["fits"]
    assert row["hot_loop"]["mma"] > 0 and row["hot_loop"]["instructions"] > row["hot_loop"]["mma"]


def _triton_call(q, k, v, mask):
    out, lse = mplug_kernels.co_attention(q, k, v, mask, return_lse=True, backend="triton")
    return out, lse, torch.autograd.grad((out * torch.ones_like(out)).sum(), (q, k, v), allow_unused=True)


def test_empty_batch_gives_empty_outputs_and_grads():
    batch, q_len, heads, head_dim, k_len = 0, 25, 2, 32, 40
    q = torch.randn(batch, q_len, heads, head_dim, requires_grad=True)
    k = torch.randn(batch, k_len, heads, head_dim, requires_grad=True)
    v = torch.randn(batch, k_len, heads, head_dim, requires_grad=True)
    mask = torch.ones(batch, k_len, dtype=torch.bool)
    skip_unless_supported("triton", q, [k], [v], [mask])
    out, lse, (dq, dk, dv) = _triton_call(q, k, v, mask)
    assert out.shape == q.shape and lse.shape == (batch, heads, q_len)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_in_masked_keys_and_values_does_not_leak(num_splits):
    """A NaN or inf in a padded key or value row changes nothing: masked positions are selected, not multiplied."""
    generator = torch.Generator().manual_seed(16)
    q, k, v = (torch.randn(2, n, 2, 32, generator=generator) for n in (5, 150, 150))
    mask = torch.rand(2, 150, generator=generator) > 0.3
    mask[1] = False  # a fully masked row: zeros
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[~mask] = float("nan")
    poisoned_v[~mask] = float("inf")
    skip_unless_supported("triton", q, [k], [v], [mask])
    force_num_splits(num_splits)
    try:
        clean = _triton_call(*(x.clone().requires_grad_() for x in (q, k, v)), mask)
        poisoned = _triton_call(*(x.clone().requires_grad_() for x in (q, poisoned_k, poisoned_v)), mask)
    finally:
        force_num_splits(None)
    _, _, _, out_ref, _ = reference64(q, [k], [v], [mask], 32 ** -0.5)
    torch.testing.assert_close(clean[0].double(), out_ref, rtol=1e-4, atol=1e-4)
    for got, want in zip((poisoned[0], poisoned[1], *poisoned[2]), (clean[0], clean[1], *clean[2])):
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=False)
