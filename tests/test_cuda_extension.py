"""The CUDA kernels' extension: build info, exported kernels, argument errors and the split plan;
the host-tested row math; and forced split-KV and both dQ paths against float64, which run on a
GPU, or where none exists on the CPU emulator build of the same kernel sources."""
from __future__ import annotations

import itertools
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
import torch

import cuda_emulator
import mplug_kernels
from mplug_kernels.backends import AttentionCall, BACKENDS
from mplug_kernels.backends import cuda as cuda_backend
from mplug_kernels.backends.kernel_inputs import force_num_splits
from mplug_kernels.occupancy import KEY_TILE, forward_rows_per_cta, split_plan
from attention_testing import (
    MASK_KINDS,
    assert_within_budget,
    grads,
    low_precision_baseline,
    make_mask,
    random_tensor,
    reference64,
    skip_unless_supported,
)

CSRC = Path(__file__).resolve().parent.parent / "csrc"
EXTENSION = cuda_backend.load_extension()
BUILT = not isinstance(EXTENSION, ImportError)
needs_extension = pytest.mark.skipif(not BUILT, reason=f"no kernel extension: {EXTENSION}")
NO_VIEW = (0, 0, 0, 0)
# (k, v, mask, mask stride_b, length, dk, dv, key positions, their stride_b) of 64 keys without data
NO_SOURCE = (NO_VIEW, NO_VIEW, 0, 0, 64, NO_VIEW, NO_VIEW, 0, 0)


INSTALLED = cuda_backend.installed_extension()
needs_installed = pytest.mark.skipif(isinstance(INSTALLED, ImportError), reason=f"mplug_kernels._C not built: {INSTALLED}")


def _forward_args(**overrides):
    """Keyword arguments of _C.attention_forward for a tiny call with null pointers."""
    args = dict(
        dtype="float16", shape=(1, 1, 1, 64), scale=0.125, q=NO_VIEW, out=NO_VIEW, lse=0,
        sources=[NO_SOURCE], num_splits=1, split_size=64,
        part_out=0, part_lse=0, stream=0,
    )
    args.update(overrides)
    return args


def test_build_info_says_whether_built():
    info = cuda_backend.build_info()
    assert {"built", "archs", "nvcc", "error"} <= set(info)
    assert info["built"] == BUILT
    if BUILT:
        assert info["error"] is None and info["archs"] and info["nvcc"]
        assert info["platform"] in ("cuda", "cpu-emulator")
    else:
        assert "_C" in info["error"]


@needs_installed
def test_installed_extension_targets_sm80_or_newer():
    info = INSTALLED.build_info()
    assert info["platform"] == "cuda"
    assert all(int(arch.rstrip("af")) >= 80 for arch in info["archs"].split(";"))


@pytest.mark.parametrize("which", ["installed", "in use"])
def test_extension_exports_every_kernel(which):
    """pip's _C, and the module the backend uses (the same, or the emulator build), export every kernel."""
    extension = INSTALLED if which == "installed" else EXTENSION
    if isinstance(extension, ImportError):
        pytest.skip(f"not built: {extension}")
    info = extension.build_info()
    assert tuple(info["head_dims"]) == cuda_backend.HEAD_DIMS == BACKENDS["cuda"].head_dims
    assert info["dtypes"] == list(cuda_backend.DTYPE_NAMES.values())
    expected = {f"{kernel}<{dtype}, {d}>" for kernel, dtype, d in
                itertools.product(["forward", "dkdv", "dq"], info["dtypes"], info["head_dims"])}
    expected |= {f"{kernel}<{dtype}>" for kernel, dtype in itertools.product(["combine", "delta"], info["dtypes"])}
    assert set(info["kernels"]) == expected
    assert callable(extension.attention_forward) and callable(extension.attention_backward)


@needs_extension
@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(dtype="float32"), "dtype must be 'float16' or 'bfloat16'"),
        (dict(shape=(1, 1, 1, 48)), "head_dim 48"),
        (dict(sources=[]), "sources must hold 1..4"),
        (dict(sources=[NO_SOURCE] * 5), "sources must hold 1..4"),
        (dict(query_positions=(16, 64)), "key positions and query positions must be given together"),
        (dict(sources=[NO_SOURCE[:7] + (16, 64)]), "key positions and query positions must be given together"),
        (dict(num_splits=65), "num_splits must be in 1..64"),
        (dict(split_size=100), "split_size must be a positive multiple of 64"),
        (dict(num_splits=2), "split-KV needs part_out and part_lse"),
        (dict(num_splits=2, part_out=16, part_lse=16), "leaves the last split without keys"),
    ],
)
def test_bad_arguments_raise_value_error(overrides, message):
    with pytest.raises(ValueError, match=message):
        EXTENSION.attention_forward(**_forward_args(**overrides))


@needs_installed
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised where no CUDA device can run")
def test_launch_failure_raises_runtime_error_with_cuda_message():
    with pytest.raises(RuntimeError, match=r"mplug_kernels CUDA error in forward_kernel: cudaError"):
        INSTALLED.attention_forward(**_forward_args())


@needs_extension
def test_kernel_key_tile_is_the_split_plans():
    assert EXTENSION.KEYS_PER_TILE == KEY_TILE


@needs_extension
@pytest.mark.parametrize("head_dim, q_len, rows", [(64, 1, 32), (64, 25, 32), (64, 32, 32), (64, 33, 64), (64, 127, 64),
                                                  (32, 128, 128), (32, 602, 128), (64, 128, 128), (64, 602, 128),
                                                  (80, 602, 128), (96, 602, 64), (128, 602, 64), (96, 25, 32),
                                                  (128, 25, 64)])
def test_forward_launch_rows_per_cta(head_dim, q_len, rows):
    """16 query rows per warp, 2 warps up to 32 queries (D <= 96), 4 warps of 32 rows from 128 queries on (D <= 80),
    else 4 warps of 16: mPLUG's 25 text queries take 32 rows, not 64 or 128 (warps past the queries only load K/V);
    the 577-602 queries of a connected layer (D = 64) take 128-row CTAs (K/V read 5 times per (b, h), not 10)."""
    rows_per_cta, ctas_per_sm = EXTENSION.forward_launch("bfloat16", head_dim, q_len)
    assert rows_per_cta == rows == forward_rows_per_cta("cuda", q_len, head_dim, 2) and ctas_per_sm >= 1
    with pytest.raises(ValueError, match="head_dim 48"):
        EXTENSION.forward_launch("bfloat16", 48, q_len)


@needs_extension
@pytest.mark.parametrize("batch, plan", [(1, (5, 128)), (64, (1, 640))])
def test_split_plan_follows_occupancy(batch, plan):
    """mPLUG's VQA cross-attention (H = 12, Lq = 25, Lk = 577): 12 CTAs at B = 1 are split into 5 ranges of two key
    tiles (the last one 65 keys); 768 CTAs at B = 64 fill a wave unsplit. The backend's plan is split_plan's with
    the kernel's own CTAs per SM (the emulator reports an H100's)."""
    q = torch.empty(batch, 25, 12, 64, dtype=torch.bfloat16, device=cuda_backend.kernel_device_type())
    ctas_per_sm = EXTENSION.forward_launch("bfloat16", 64, 25)[1]
    assert cuda_backend._split(EXTENSION, q, 577) == split_plan(batch, 12, 25, 577, 64, 2, ctas_per_sm=ctas_per_sm)
    assert split_plan(batch, 12, 25, 577, 64, 2, ctas_per_sm=ctas_per_sm) == plan


@pytest.mark.parametrize(
    "program, includes",
    [
        # the kernels' row math and backward key tiles (csrc/row_math.h, key_tiles.h)
        ("host_test.cpp", [CSRC]),
        # the CPU emulator behaves like the GPU and raises on the mistakes it promises to catch
        ("emulator/emulator_test.cpp", [CSRC, CSRC / "tests" / "emulator"]),
    ],
)
def test_host_program_passes(tmp_path, program, includes):
    """A C++ test program under csrc/tests, compiled for the host with g++; exit status 0 means it passed."""
    compiler = cuda_emulator.host_compiler()
    if compiler is None:
        pytest.skip("no host C++ compiler")
    binary = tmp_path / "program"
    subprocess.run([compiler, "-std=c++20", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas",
                    *[f"-I{path}" for path in includes], str(CSRC / "tests" / program), "-o", str(binary)], check=True)
    result = subprocess.run([str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_emulated_kernels_stay_in_bounds_under_valgrind(tmp_path):
    """csrc/tests/emulator/bounds_test.cpp under memcheck: no read or write outside a tensor, every output written."""
    compiler, valgrind = cuda_emulator.host_compiler(), shutil.which("valgrind")
    if compiler is None or valgrind is None:
        pytest.skip("needs a host C++ compiler and valgrind")
    module = cuda_emulator.build()
    binary = tmp_path / "bounds_test"
    subprocess.run([compiler, *cuda_emulator.FLAGS, f"-I{CSRC}", f"-I{CSRC / 'tests' / 'emulator'}",
                    str(CSRC / "tests" / "emulator" / "bounds_test.cpp"), *map(str, cuda_emulator.kernel_objects(module)),
                    "-o", str(binary)], check=True)
    result = subprocess.run([valgrind, "--error-exitcode=3", "--quiet", str(binary)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


@pytest.mark.parametrize("dtype, head_dim, reason", [(torch.float32, 64, "dtype"), (torch.float16, 40, "head dim")])
def test_backend_declares_what_it_cannot_run(dtype, head_dim, reason):
    call = AttentionCall("cuda", dtype, head_dim, 1, False, False, True)
    reasons = " ".join(BACKENDS["cuda"].reasons(call))
    assert reason in reasons or (not BUILT and "not built" in reasons)
    assert BACKENDS["cuda"].rank(call) > BACKENDS["triton"].rank(call)


@pytest.fixture
def forced_splits():
    yield force_num_splits
    force_num_splits(None)


@pytest.fixture(params=["default", "eager-copies", "warps-descending", "lockstep"])
def emulator_setting(request, monkeypatch):
    """The emulator's cp.async timing (copies land at the wait by default, at issue when eager) and warp
    order between barriers (one warp after the other, ascending by default). On a GPU the hardware
    decides, so only the default run takes place."""
    if request.param != "default" and cuda_backend.kernel_device_type() == "cuda":
        pytest.skip("an emulator setting; the GPU run covers the hardware's own timing")
    if request.param == "eager-copies":
        monkeypatch.setenv("MPLUG_KERNELS_EMULATOR_EAGER_COPIES", "1")
    elif request.param != "default":
        monkeypatch.setenv("MPLUG_KERNELS_EMULATOR_SCHEDULE", request.param)
    return request.param


def multi_source_inputs(batch, q_len, lengths, heads, head_dim, dtype, mask_kind, generator, requires_grad=False):
    """q [B, Lq, H, D] and per source k, v [B, Lk_i, H, D] and a key mask of mask_kind, drawn in that order."""
    draw = lambda n: random_tensor(batch, n, heads, head_dim, dtype=dtype, generator=generator,  # noqa: E731
                                   requires_grad=requires_grad)
    q = draw(q_len)
    ks, vs = [draw(n) for n in lengths], [draw(n) for n in lengths]
    return q, ks, vs, [make_mask(mask_kind, batch, n, generator) for n in lengths]


@pytest.mark.parametrize("num_splits", [1, 2, 5, 64])
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_forward_with_forced_splits_over_three_sources(forced_splits, emulator_setting, num_splits, mask_kind, dtype):
    generator = torch.Generator().manual_seed(num_splits)
    q, ks, vs, masks = multi_source_inputs(3, 25, [257, 25, 70], 4, 64, dtype, mask_kind, generator)
    skip_unless_supported("cuda", q, ks, vs, masks)
    forced_splits(num_splits)
    out, lse = cuda_backend.forward(q, ks, vs, masks, 0.125)
    _, _, _, out64, lse64 = reference64(q, ks, vs, masks, 0.125)
    baseline_out, baseline_lse = low_precision_baseline(q, ks, vs, masks, 0.125)
    assert_within_budget("out", out, out64, baseline_out, factor=2)
    assert_within_budget("lse", lse, lse64, baseline_lse, factor=2)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("with_dlse", [False, True])
def test_backward_both_dq_paths_over_two_sources(emulator_setting, deterministic, with_dlse):
    generator = torch.Generator().manual_seed(7)
    dtype = torch.bfloat16
    q, ks, vs, masks = multi_source_inputs(2, 40, [300, 30], 3, 96, dtype, "padding", generator, requires_grad=True)
    skip_unless_supported("cuda", q, ks, vs, masks)
    scale = 96 ** -0.5
    dout = random_tensor(2, 40, 3, 96, dtype=dtype, generator=generator)
    dlse = random_tensor(2, 3, 40, dtype=torch.float32, generator=generator) if with_dlse else None
    with torch.no_grad():
        out, lse = cuda_backend.forward(q, ks, vs, masks, scale)
        dq, dks, dvs = cuda_backend.backward(dout, dlse, q, ks, vs, masks, out, lse, scale, deterministic)
    q64, ks64, vs64, out64, lse64 = reference64(q, ks, vs, masks, scale)
    inputs64 = [q64, *ks64, *vs64]
    expected = grads([out64] + ([lse64] if with_dlse else []), inputs64, [dout] + ([dlse] if with_dlse else []))
    baseline = grads(list(low_precision_baseline(q, ks, vs, masks, scale))[: 2 if with_dlse else 1],
                     [q, *ks, *vs], [dout] + ([dlse] if with_dlse else []))
    for name, ours, ref, base in zip(["dq", "dk0", "dk1", "dv0", "dv1"], [dq, *dks, *dvs], expected, baseline):
        assert_within_budget(name, ours, ref, base, factor=2)


@needs_extension
@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_key_gives_nan_lse_exactly_where_out_is_nan(forced_splits, num_splits):
    """Issue 16 item 8: a NaN in a visible key makes its batch's rows NaN in out and in lse (not -inf or a finite
    lse), with and without split-KV; a NaN in a masked key changes nothing."""
    generator = torch.Generator().manual_seed(8)
    q, k, v = (random_tensor(2, n, 2, 64, dtype=torch.float16, generator=generator) for n in (5, 150, 150))
    mask = torch.ones(2, 150, dtype=torch.bool)
    mask[1, 100:] = False
    skip_unless_supported("cuda", q, [k], [v], [mask])
    k[0, 70, 1, 3] = float("nan")   # visible key of batch 0, head 1
    k[1, 120, 0, 5] = float("nan")  # masked key of batch 1
    forced_splits(num_splits)
    device = cuda_backend.kernel_device_type()
    out, lse = cuda_backend.forward(q.to(device), [k.to(device)], [v.to(device)], [mask.to(device)], 0.125)
    out_nan = out.isnan().any(dim=-1).transpose(1, 2).cpu()  # [B, H, Lq]
    expected = torch.zeros(2, 2, 5, dtype=torch.bool)
    expected[0, 1] = True
    assert torch.equal(out_nan, expected) and torch.equal(lse.isnan().cpu(), expected)
    assert lse[~expected].isfinite().all()


@needs_extension
@pytest.mark.parametrize("num_splits", [1, 3])
def test_nan_query_of_a_fully_masked_batch_row_gives_zeros(forced_splits, num_splits):
    """Issue 20 item 3: the kernel (no Python pre-pass) gives a query row that sees no key output 0 and lse -inf, even
    when the query holds NaN or inf; the other batch row is untouched."""
    generator = torch.Generator().manual_seed(20)
    q, k1, v1, k2, v2 = (random_tensor(2, n, 2, 64, dtype=torch.bfloat16, generator=generator)
                         for n in (7, 130, 130, 70, 70))
    masks = [torch.ones(2, 130, dtype=torch.bool), torch.ones(2, 70, dtype=torch.bool)]
    masks[0][1], masks[1][1] = False, False
    q[1, 2, 0, 5], q[1, 4, 1, :] = float("nan"), float("inf")
    skip_unless_supported("cuda", q, [k1, k2], [v1, v2], masks)
    forced_splits(num_splits)
    device = cuda_backend.kernel_device_type()
    inputs = [x.to(device) for x in (q, k1, k2, v1, v2, *masks)]
    out, lse = cuda_backend.forward(inputs[0], inputs[1:3], inputs[3:5], inputs[5:], 0.125)
    assert torch.equal(out[1].cpu(), torch.zeros_like(out[1].cpu())) and bool((lse[1] == -float("inf")).all())
    first = ([x[:1] for x in xs] for xs in ([k1, k2], [v1, v2], masks))
    ks, vs, first_masks = first
    _, _, _, out64, lse64 = reference64(q[:1], ks, vs, first_masks, 0.125)
    baseline_out, baseline_lse = low_precision_baseline(q[:1], ks, vs, first_masks, 0.125)
    assert_within_budget("out", out[:1].cpu(), out64, baseline_out, factor=2)
    assert_within_budget("lse", lse[:1].cpu(), lse64, baseline_lse, factor=2)


@needs_extension
@pytest.mark.parametrize("num_splits", [1, 2])
def test_key_tiles_with_one_kept_key_are_not_skipped(forced_splits, num_splits):
    """Issue 20 item 3: a key tile is skipped only when no key of it is kept: tiles holding exactly one kept key
    (first, last, or one in the middle of the tile), next to fully masked tiles, match the reference."""
    generator = torch.Generator().manual_seed(21)
    q, k, v = (random_tensor(3, n, 2, 64, dtype=torch.float16, generator=generator) for n in (20, 300, 300))
    mask = torch.zeros(3, 300, dtype=torch.bool)
    mask[0, 0:64] = True
    mask[0, 64 + 37] = True   # tile 1: one key, tile 2 none, tile 3: its last key
    mask[0, 255] = True
    mask[1, 128] = True       # only the first key of tile 2
    mask[2, 299] = True       # only the last key
    skip_unless_supported("cuda", q, [k], [v], [mask])
    forced_splits(num_splits)
    device = cuda_backend.kernel_device_type()
    out, lse = cuda_backend.forward(q.to(device), [k.to(device)], [v.to(device)], [mask.to(device)], 0.125)
    _, _, _, out64, lse64 = reference64(q, [k], [v], [mask], 0.125)
    baseline_out, baseline_lse = low_precision_baseline(q, [k], [v], [mask], 0.125)
    assert_within_budget("out", out.cpu(), out64, baseline_out, factor=2)
    assert_within_budget("lse", lse.cpu(), lse64, baseline_lse, factor=2)


@needs_extension
def test_concurrent_calls_from_threads_match_serial_ones():
    """Issue 16 item 9: four threads calling co_attention(backend="cuda") at once (the binding releases the GIL;
    the emulator serialises launches, a GPU runs each on its thread's current stream) get the serial results."""
    device = cuda_backend.kernel_device_type()
    generator = torch.Generator().manual_seed(9)
    inputs = [[random_tensor(1, n, 2, 32, dtype=torch.float16, generator=generator).to(device) for n in (9, 70, 70)]
              for _ in range(4)]
    skip_unless_supported("cuda", inputs[0][0], [inputs[0][1]], [inputs[0][2]], [None])
    serial = [mplug_kernels.co_attention(q, k, v, backend="cuda") for q, k, v in inputs]
    results, errors = [None] * 4, []

    def run(i):
        try:
            for _ in range(3):
                results[i] = mplug_kernels.co_attention(*inputs[i], backend="cuda")
        except Exception as error:  # reported below, with the thread that raised it
            errors.append((i, error))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for got, expected in zip(results, serial):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k_lens", [[70, 9], [25, 77, 3]])
def test_backward_never_reads_masked_keys_or_keyless_queries(dtype, deterministic, k_lens):
    """NaN in masked keys and values, and in the queries and dO of rows without a visible key, reach no gradient
    (issue 16 item 11: selected, not multiplied); every gradient matches float64 within budget, masked keys get 0.
    The backward's 64-key tiles span sources (25 + 77 + 3 keys: tile 0 holds keys of sources 0 and 1, tile 1 of
    sources 1 and 2), each key row loaded from and its dK/dV written to its own source."""
    generator = torch.Generator().manual_seed(11)
    q, ks, vs, masks = multi_source_inputs(2, 37, k_lens, 2, 64, dtype, "one_row_fully_masked", generator,
                                           requires_grad=True)
    skip_unless_supported("cuda", q, ks, vs, masks)
    dout = random_tensor(2, 37, 2, 64, dtype=dtype, generator=generator)
    q64, ks64, vs64, out64, lse64 = reference64(q, ks, vs, masks, 0.125)
    expected = grads([out64], [q64, *ks64, *vs64], [dout])
    baseline = grads(list(low_precision_baseline(q, ks, vs, masks, 0.125))[:1], [q, *ks, *vs], [dout])
    dirty = lambda x, hidden: x.detach().masked_fill(hidden[:, :, None, None], float("nan"))
    dead = torch.zeros(2, 37, dtype=torch.bool, device=q.device)
    dead[0] = True  # batch element 0 sees no key
    dq, dks, dvs = cuda_backend.backward(
        dirty(dout, dead), None, dirty(q, dead), [dirty(k, ~m) for k, m in zip(ks, masks)],
        [dirty(v, ~m) for v, m in zip(vs, masks)], masks, out64.to(dtype), lse64.float(), 0.125, deterministic,
    )
    names = ["dq"] + [f"dk{i}" for i in range(len(ks))] + [f"dv{i}" for i in range(len(vs))]
    for name, ours, ref, base in zip(names, [dq, *dks, *dvs], expected, baseline):
        assert_within_budget(name, ours, ref, base, factor=2)
    assert not dq[0].any()
    for dk, dv, mask in zip(dks, dvs, masks):
        assert not dk[~mask].any() and not dv[~mask].any()
