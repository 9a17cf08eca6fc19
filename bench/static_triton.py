"""Every Triton kernel the ``triton`` backend can launch, compiled ahead of time for sm_80 and sm_90 on the CPU.

``triton_kernel_rows()`` builds the backend's own launches (mplug_kernels.ops.triton_launch's
forward_launches / backward_launches) for mPLUG's shapes (B = 2, H = 12, keys [577 vision; 25 text] with masks,
Lq in {25, 602} so BLOCK_M is 32 and 64; at Lq = 602 also the forward, dK/dV and dQ with positional visibility,
named "<kernel>+positions") at every head dim and dtype, and compiles each kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and the signature, constexprs and
16-divisibility attributes the JIT itself derives from those arguments at run time. The forward is compiled
in each autotuning candidate of its dtype; candidates that spill or do not fit the arch are dropped, as the
backend's early_config_prune drops them before tuning. Each row: kernel, backend, arch, dtype, head_dim,
config, registers, spill_bytes (ptxas -v), stack_bytes, local_bytes (cuobjdump -res-usage), shared_bytes
(the launch's dynamic shared memory), threads, ctas_per_sm, warps_per_sm, and the SASS hot loop's counts
(bench.sass.count_loop). Compiles run in a pool of spawned processes with TRITON_INTERPRET=0 and a fresh
Triton cache, so every compile runs ptxas (about four minutes on 2 cores).
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

ARCHS = (80, 90)
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = ("float16", "bfloat16", "float32")
Q_LENS = (25, 602)  # BLOCK_M 32 and 64
SPLIT_Q_LEN = 25  # the combine of the split-KV forward is compiled at this Lq
SPLIT_COUNTS = (2, 32, 64)  # SPLITS_POW2 2, 32 and 64 (32 and 64 splits of whole key tiles over LONG_KEYS keys)
BATCH, HEADS, KEY_LENS, LONG_KEYS = 2, 12, (577, 25), 4096


def aot_unavailable_reason() -> Optional[str]:
    """Why this Triton cannot compile for CUDA ahead of time here, or None."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend  # noqa: F401
        from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: F401

        make_backend(GPUTarget("cuda", 80, 32))
    except Exception as error:  # an older or CPU-only Triton: ImportError, AttributeError, RuntimeError
        return f"triton cannot compile for CUDA ahead of time here ({type(error).__name__}: {error})"
    if not hasattr(JITFunction, "_pack_args"):
        return f"triton {triton.__version__} has no JITFunction._pack_args (the JIT's argument specialisation)"
    return None


def aot_source(kernel, args: Sequence, meta: dict, arch: int):
    """(ASTSource, GPUTarget, options) of a @triton.jit kernel for sm_<arch>, specialised on `args` and `meta`
    exactly as the JIT specialises that launch (16-divisible pointers and ints, ints equal to 1)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound_args, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def aot_compile(source, target, options):
    """(CompiledKernel, ptxas -v log) of an aot_source; the log is empty when Triton's cache held the kernel."""
    import triton
    from triton import knobs

    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(source, target=target, options=options.__dict__)
    return compiled, log.getvalue()


def _tensors(dtype_name: str, head_dim: int, q_len: int):
    import torch

    dtype = getattr(torch, dtype_name)
    q = torch.randn(BATCH, q_len, HEADS, head_dim).to(dtype)
    ks = [torch.randn(BATCH, n, HEADS, head_dim).to(dtype) for n in KEY_LENS]
    vs = [torch.randn_like(k) for k in ks]
    masks = [torch.ones(BATCH, n, dtype=torch.uint8) for n in KEY_LENS]
    return q, ks, vs, masks


def _launches(dtype_name: str, head_dim: int, q_len: int) -> List[Tuple[str, object]]:
    """(kernel name, Launch) of every launch the backend makes at this dtype, head dim and Lq."""
    import torch

    from mplug_kernels.ops import triton_launch as at

    q, ks, vs, masks = _tensors(dtype_name, head_dim, q_len)
    out = torch.empty_like(q)
    lse = torch.empty(BATCH, HEADS, q_len)
    unsplit = at.split_keys(sum(KEY_LENS), 1, at.SPLIT_KEYS)
    named = [("forward", at.forward_launches(q, ks, vs, masks, 0.125, out, lse, unsplit)[0])]
    if q_len == SPLIT_Q_LEN:
        long_keys = torch.randn(BATCH, LONG_KEYS, HEADS, head_dim).to(q.dtype)
        for splits in SPLIT_COUNTS:
            short = splits * at.SPLIT_KEYS <= sum(KEY_LENS)
            sources = (ks, vs, masks) if short else ([long_keys], [long_keys], [None])
            plan = at.split_keys(sum(KEY_LENS) if short else LONG_KEYS, splits, at.SPLIT_KEYS)
            named.append(("combine", at.forward_launches(q, *sources, 0.125, out, lse, plan)[1]))
    positions = None if q_len == SPLIT_Q_LEN else _positions(q_len)
    variants = [("", None)] + ([("+positions", positions)] if positions is not None else [])
    if positions is not None:
        named.append(("forward+positions", at.forward_launches(q, ks, vs, masks, 0.125, out, lse, unsplit, positions)[0]))
    dq_acc = torch.zeros(q.shape)
    names = {at._delta_kernel: "delta", at._dkdv_kernel: "dkdv", at._dq_kernel: "dq"}
    for deterministic, dlse in ((False, lse), (True, None)):
        for suffix, given in variants:
            launches = at.backward_launches(out, dlse, q, ks, vs, masks, out, lse, 0.125, deterministic, dq_acc,
                                            [torch.empty_like(k) for k in ks], [torch.empty_like(v) for v in vs], given)
            named += [(names[launch.kernel] + suffix, launch) for launch in launches
                      if not (suffix and launch.kernel is at._delta_kernel)]
    return named


def _positions(q_len: int):
    """Owl3-like positional visibility at Lq = q_len: the image source's keys at position 3, the text keys causal."""
    import torch

    from mplug_kernels.backends.base import Positions

    image = torch.full((BATCH, KEY_LENS[0]), 3, dtype=torch.int32)
    text = torch.arange(KEY_LENS[1], dtype=torch.int32).expand(BATCH, -1).contiguous()
    queries = torch.arange(q_len, dtype=torch.int32).expand(BATCH, -1).contiguous()
    return Positions((image, text), queries)


def _configs(launch) -> List[dict]:
    """Keyword arguments to compile a launch with: each autotuning candidate for the tuned forward."""
    from mplug_kernels.ops import triton_launch as at

    if not launch.tuned:
        return [dict(launch.meta)]
    element_bytes = launch.args[0].element_size()
    return [{**launch.meta, **at.config_meta(config)} for config in at.forward_candidates(element_bytes)]


def _config_text(meta: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in sorted(meta.items()) if key != "PRECISION")


def _sass_facts(cubin: bytes, name: str, arch: int) -> Dict[str, object]:
    """cuobjdump -res-usage fields and the SASS hot-loop counts of one cubin (bench.sass)."""
    from bench import sass

    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        usage = sass.resource_usage(sass.run_cuobjdump(Path(file.name), "-res-usage"))
        functions = sass.split_functions(sass.disassemble(Path(file.name)), default_arch=arch)
    resources = next(iter(usage.values()), {})
    body = next((instructions for (_, function), instructions in functions.items() if function == name), [])
    loop = sass.hot_loop(body)
    return {"stack_bytes": resources.get("stack"), "local_bytes": resources.get("local"),
            "hot_loop": sass.count_loop(loop) if loop else None}


def _row(name: str, launch, meta: dict, arch: int, dtype_name: str, head_dim: int, memo: dict) -> dict:
    from bench import sass
    from mplug_kernels.ops import triton_launch as at

    source, target, options = aot_source(launch.kernel, launch.args, meta, arch)
    key = (source.hash(), options.hash(), arch)
    if key not in memo:
        compiled, log = aot_compile(source, target, options)
        usage = next(iter(sass.ptxas_usage(log).values()), None)
        if usage is None:
            raise RuntimeError(f"no ptxas -v log for {name} ({_config_text(meta)}, sm_{arch})")
        threads = compiled.metadata.num_warps * 32
        facts = at.KernelFacts(usage["registers"], max(usage["spill_stores"], usage["spill_loads"]),
                               compiled.metadata.shared, threads)
        memo[key] = {"registers": facts.registers, "spill_bytes": facts.spill_bytes, "shared_bytes": facts.shared_bytes,
                     "threads": threads, "ctas_per_sm": facts.ctas_per_sm(arch),
                     "warps_per_sm": facts.ctas_per_sm(arch) * compiled.metadata.num_warps,
                     "fits": facts.fits(arch), **_sass_facts(compiled.asm["cubin"], compiled.metadata.name, arch)}
    return {"kernel": name, "backend": "triton", "arch": arch, "dtype": dtype_name, "head_dim": head_dim,
            "config": _config_text(meta), **memo[key]}


def launch_rows(dtype_name: str, head_dim: int, q_len: int, arch: int, kernels: Optional[Sequence[str]] = None,
                memo: Optional[dict] = None) -> Tuple[List[dict], int]:
    """(launchable rows, pruned count) of the backend's launches (or those named in `kernels`) at one dtype,
    head dim, Lq and arch. Forward candidates that spill or do not fit are pruned, as the backend prunes them
    before tuning; raises when none is left. `memo` shares compiles between calls. Needs TRITON_INTERPRET=0."""
    memo = {} if memo is None else memo
    rows, pruned = [], 0
    for name, launch in _launches(dtype_name, head_dim, q_len):
        if kernels is not None and name not in kernels:
            continue
        candidates = [_row(name, launch, meta, arch, dtype_name, head_dim, memo) for meta in _configs(launch)]
        kept = [row for row in candidates if row["fits"] or not launch.tuned]
        if not kept:
            raise RuntimeError(f"no {name} candidate fits sm_{arch}, {dtype_name}, D={head_dim}: {launch.meta}")
        rows, pruned = rows + kept, pruned + len(candidates) - len(kept)
    unique = {(row["kernel"], row["config"]): row for row in reversed(rows)}  # two sources: the same kernel twice
    return [row for row in rows if unique[(row["kernel"], row["config"])] is row], pruned


def _job_rows(job: Tuple[str, int, Tuple[int, ...]]) -> Tuple[List[dict], int]:
    """launch_rows at every Lq for one dtype and arch and the head dims that share a BLOCK_D (compiled once)."""
    dtype_name, arch, head_dims = job
    memo: dict = {}
    results = [launch_rows(dtype_name, head_dim, q_len, arch, memo=memo) for head_dim in head_dims for q_len in Q_LENS]
    return [row for rows, _ in results for row in rows], sum(pruned for _, pruned in results)


def compile_pool(workers: int, cache_dir: str) -> ProcessPoolExecutor:
    """Spawned worker processes that compile for CUDA (TRITON_INTERPRET=0) into a fresh Triton cache."""
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_worker_setup,
                               initargs=(cache_dir,))


def _worker_setup(cache_dir: str) -> None:
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def _jobs(archs: Sequence[int]) -> List[Tuple[str, int, Tuple[int, ...]]]:
    """(dtype, arch, head dims sharing a BLOCK_D), the largest BLOCK_D first so the pool ends evenly."""
    by_block: Dict[int, List[int]] = {}
    for head_dim in HEAD_DIMS:
        by_block.setdefault(max(16, 1 << (head_dim - 1).bit_length()), []).append(head_dim)
    return [(dtype, arch, tuple(by_block[block])) for block in sorted(by_block, reverse=True)
            for arch in archs for dtype in DTYPES]


def triton_kernel_rows(archs: Sequence[int] = ARCHS, workers: int = 2) -> List[dict]:
    """One row per Triton kernel x launchable config x head dim x dtype x arch (see the module docstring)."""
    reason = aot_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="triton-static-") as cache_dir:
        with compile_pool(workers, cache_dir) as pool:
            results = list(pool.map(_job_rows, _jobs(archs)))
    rows = [row for job_rows, _ in results for row in job_rows]
    pruned = sum(count for _, count in results)
    print(f"triton: {len(rows)} launchable kernel rows ({pruned} forward candidates pruned) "
          f"in {time.monotonic() - started:.0f} s", file=sys.stderr)
    return rows
