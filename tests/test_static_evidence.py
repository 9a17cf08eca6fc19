"""Static GPU evidence: the SASS reader (bench/sass.py) on hand-written SASS, and the CI gate on every kernel
compiled ahead of time by bench.static (nvcc for sm_80 and sm_90, Triton via bench/static_triton.py).

The gate holds at issue 10's targets: no kernel spills or uses local memory; shared memory fits sm_80
(163 KB) and sm_90 (227 KB); the CUDA forward's hot loop (bf16, D = 64, sm_90) issues <= 10 instructions (the positional one <= 11)
per MMA, has <= 2 barriers per key tile and reads its MMA fragments from shared memory only by LDSM; the
CUDA forward and backward reach >= 8 warps per SM on an H100; the CUDA combine keeps >= 4 global loads in
flight; issue 20's: no CALL (ptxas' loop-exit CALL.REL.NOINC apart, bench.sass.is_loop_exit_call) and no global
load read before the first MMA in a CUDA hot loop; dK/dV (bf16, D = 64) <= 14 instructions per MMA.
MPLUG_KERNELS_CUDA_ARCHS (e.g. "90" in CI) trims the archs compiled.
"""
import os

import pytest

from bench import sass, static
from mplug_kernels.occupancy import SM_LIMITS

MAX_INSTRUCTIONS_PER_MMA = 10
MAX_POSITIONAL_INSTRUCTIONS_PER_MMA = 11
MAX_BARRIERS_PER_KEY_TILE = 2
MIN_WARPS_PER_SM_H100 = 8
MIN_COMBINE_LOADS_IN_FLIGHT = 4
MAX_DKDV_INSTRUCTIONS_PER_MMA = 14
# CI compiles only the archs of MPLUG_KERNELS_CUDA_ARCHS (e.g. "90"), the default both of bench.static.ARCHS.
GATE_ARCHS = tuple(int(arch) for arch in os.environ.get("MPLUG_KERNELS_CUDA_ARCHS", "80;90").replace(",", ";").split(";"))

# cuobjdump layout: a loop from 0x20 to the back edge at 0xc0, an unreachable self-branch after EXIT.
CUOBJDUMP_SNIPPET = """
\tcode for sm_90
\t\tFunction : kernel_a
\t.headerflags\t@"EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   S2R R0, SR_TID.X ;                          /* 0x0000000000007919 */
                                                                               /* 0x000e220000002100 */
        /*0010*/                   MOV R1, 0x0 ;                               /* 0x0000000000017802 */
        /*0020*/                   LDSM.16.M88.4 R4, [R0] ;                    /* 0x000000000004783b */
        /*0030*/                   LDSM.16.MT88.2 R8, [R0+0x200] ;             /* 0x000200000008783b */
        /*0040*/                   LDS.64 R10, [R0+0x400] ;                    /* 0x00040000000a7984 */
        /*0050*/                   HMMA.16816.F32.BF16 R12, R4, R8, R12 ;      /* 0x000000080c0c723c */
        /*0060*/                   HMMA.16816.F32.BF16 R16, R4, R10, R16 ;     /* 0x0000000a1010723c */
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;               /* 0x0000000000007b1d */
        /*0080*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R6.64] ; /* 0x0000000006027fae */
        /*0090*/                   LDG.E R20, desc[UR4][R6.64] ;               /* 0x0000000406147981 */
        /*00a0*/                   STG.E desc[UR4][R6.64], R20 ;               /* 0x0000001406007986 */
        /*00b0*/                   HFMA2.MMA R21, -RZ, RZ, 0, 0 ;              /* 0x00000000ff157435 */
        /*00c0*/               @P0 BRA 0x20 ;                                  /* 0xffffff5000000947 */
        /*00d0*/                   EXIT ;                                      /* 0x000000000000794d */
        /*00e0*/                   BRA 0xe0;                                   /* 0xfffffffc00fc7947 */
\t\t..........
\t\tFunction : kernel_b
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   EXIT ;
"""

# nvdisasm layout (labels): an outer loop 0x10-0x60 around an inner loop 0x20-0x40; the LD.E at 0x50
# writes R8, the A operand of both HMMAs on the next trip around the loop.
NVDISASM_SNIPPET = """
\t.target sm_80
\t.text.nested:
        /*0000*/                   MOV R0, RZ ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
.L_x_1:
        /*0020*/                   HMMA.16816.F32.BF16 R16, R8, R12, R16 ;
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0040*/               @P1 BRA `(.L_x_1) ;
        /*0050*/                   LD.E R8, [R2.64] ;
        /*0060*/               @P0 BRA `(.L_x_0) ;
        /*0070*/                   EXIT ;
"""

# A loop whose cold path (0x60-0x70) lies after the EXIT and jumps back into the loop.
OUT_OF_LINE_SNIPPET = """
\tcode for sm_90
\t\tFunction : rotated
        /*0000*/                   HMMA.16816.F32.BF16 R20, R8, R12, R20 ;
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P0 BRA 0x60 ;
        /*0030*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0040*/               @P1 BRA 0x10 ;
        /*0050*/                   EXIT ;
        /*0060*/                   HMMA.16816.F32.BF16 R16, R8, R12, R16 ;
        /*0070*/                   BRA 0x30 ;
"""

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_80'
ptxas info    : Function properties for _Z6kernelv
    48 bytes stack frame, 40 bytes spill stores, 24 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 2048 bytes smem, 1216 bytes cmem[0]
ptxas info    : Compile time = 1.0 ms
ptxas info    : Function properties for _Z6calleev
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z6kernelv' for 'sm_90'
ptxas info    : Function properties for _Z6kernelv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 1216 bytes cmem[0]
"""

RES_USAGE = """
Fatbin elf code:
================
arch = sm_90
code version = [1,8]

Resource usage:
 Function _Z6kernelv:
  REG:96 STACK:16 SHARED:2048 LOCAL:8 CONSTANT[0]:1216 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_cuobjdump_functions_loop_and_counts():
    functions = sass.split_functions(CUOBJDUMP_SNIPPET)
    assert sorted(functions) == [(90, "kernel_a"), (90, "kernel_b")]
    body = functions[(90, "kernel_a")]
    assert len(body) == 15 and body[12].predicate == "@P0"
    loop = sass.hot_loop(body)
    assert [instruction.address for instruction in loop] == list(range(0x20, 0xd0, 0x10))
    assert sass.count_loop(loop) == {
        "instructions": 11, "mma": 2, "ldsm": 2, "ldgsts": 1, "generic_ld": 1, "generic_st": 1, "lds": 1,
        "sts": 0, "bar": 1, "mma_operands_from_plain_loads": 1, "calls": 0, "loop_exit_calls": 0,
        "loads_used_before_mma": 0,
        "instructions_per_mma": 5.5, "ldsm_per_mma": 1.0,
    }
    assert sass.hot_loop(functions[(90, "kernel_b")]) is None


def test_nvdisasm_labels_and_nested_loops():
    body = sass.split_functions(NVDISASM_SNIPPET)[(80, "nested")]
    assert sass.branch_target(body[4]) == 0x20 and sass.branch_target(body[6]) == 0x10
    assert sorted(len(loop) for loop in sass.find_loops(body)) == [3, 6]
    counts = sass.count_loop(sass.hot_loop(body))
    assert (counts["instructions"], counts["mma"], counts["generic_ld"]) == (6, 2, 1)
    assert counts["mma_operands_from_plain_loads"] == 2
    assert counts["instructions_per_mma"] == 3.0


# ptxas' sm_80 loop exit: @P0 CALL.REL.NOINC to the instruction after the back branch (0x50); the CALL at 0x20
# goes to a function at 0x60 (a real call).
LOOP_EXIT_SNIPPET = """
\tcode for sm_80
\t\tFunction : exits
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/               @P1 CALL.REL.NOINC 0x60 ;
        /*0030*/               @P0 CALL.REL.NOINC 0x50 ;
        /*0040*/                   BRA 0x0 ;
        /*0050*/                   EXIT ;
        /*0060*/                   RET.REL.NODEC R20 0x0 ;
"""


def test_loop_exit_call_is_not_counted_as_a_call():
    loop = sass.hot_loop(sass.split_functions(LOOP_EXIT_SNIPPET)[(80, "exits")])
    assert [instruction.address for instruction in loop] == [0x0, 0x10, 0x20, 0x30, 0x40]
    assert [sass.is_loop_exit_call(loop, position) for position in range(5)] == [False, False, False, True, False]
    counts = sass.count_loop(loop)
    assert (counts["calls"], counts["loop_exit_calls"]) == (1, 1)


def test_loop_with_out_of_line_block():
    body = sass.split_functions(OUT_OF_LINE_SNIPPET)[(90, "rotated")]
    loop = sass.hot_loop(body)
    assert [instruction.address for instruction in loop] == [0x10, 0x20, 0x30, 0x40, 0x60, 0x70]
    assert sass.count_loop(loop)["mma"] == 2


def test_ptxas_and_resource_usage():
    usage = sass.ptxas_usage(PTXAS_LOG)
    assert usage[(80, "_Z6kernelv")] == {"registers": 255, "stack": 48, "spill_stores": 40, "spill_loads": 24,
                                         "shared": 2048}
    assert usage[(90, "_Z6kernelv")] == {"registers": 96, "stack": 0, "spill_stores": 0, "spill_loads": 0,
                                         "shared": 0}
    assert sass.resource_usage(RES_USAGE) == {(90, "_Z6kernelv"): {"registers": 96, "stack": 16, "local": 8,
                                                                  "shared": 2048}}


PROBE_OUTPUT = (
    "launch\tforward\t64\tbfloat16 q_len=25 keys=602 sources=2 masks splits=1\t_Z3fwdv\t12 1 1\t64 1 1\t32896\t32896\n"
    "launch\tforward\t128\tbfloat16 q_len=602 keys=602 sources=2 masks splits=1\t_Z3fwdv\t12 1 1\t64 1 1\t65664\t-1\n"
    "launch\tbackward\t64\tfloat16 q_len=25 keys=577 sources=1 dq=atomic\t_Z5deltav\t25 1 1\t128 1 1\t0\t0\n"
)


def test_probe_output_gives_threads_largest_shared_memory_dtype_and_head_dims():
    launches = static.parse_probe_output(PROBE_OUTPUT)
    assert launches["_Z3fwdv"] == static.Launch("forward", 64, 65664, {"bfloat16"}, {64, 128}, 2)
    assert launches["_Z5deltav"] == static.Launch("backward", 128, 0, {"float16"}, {64}, 1)
    with pytest.raises(RuntimeError, match="rejected"):
        static.parse_probe_output("error\tforward\t64\tfloat16 q_len=1\thead_dim 64 has no kernel\n")


def _row(**fields) -> dict:
    row = {"backend": "cuda", "kernel": "forward_kernel", "arch": 90, "dtype": "bfloat16", "head_dim": 64,
           "registers": 96, "spill_bytes": 0, "stack_bytes": 0, "local_bytes": 0, "shared_bytes": 32896,
           "ctas_per_sm": 4, "warps_per_sm": 16, "hot_loop": None}
    return {**row, **fields}


def test_readme_table_keeps_d64_and_shared_kernels_worst_case_per_family(tmp_path):
    loop = {"instructions": 300, "mma": 40, "instructions_per_mma": 7.5, "ldsm": 16, "ldgsts": 8, "generic_ld": 0,
            "lds": 0, "bar": 2, "ldsm_per_mma": 0.4}
    rows = [_row(hot_loop=loop, max_loads_in_flight=16), _row(max_loads_in_flight=8),
            _row(backend="triton", config="a", registers=128, spill_bytes=24),
            _row(backend="triton", config="b", warps_per_sm=8), _row(head_dim=128, shared_bytes=300000),
            _row(kernel="combine_kernel", head_dim=None, stack_bytes=16)]
    environment = {"wall_s": 12.0, "device": "CPU", "commit": "0123456789abcdef"}
    report = {"rows": rows, "nvcc": "nvcc V13.0.88", "triton_status": "2 rows", "environment": environment}
    table = static.readme_table(report)
    lines = [line for line in table.splitlines() if line.startswith("| ")]
    assert lines[1:] == [
        "| cuda | combine_kernel | sm_90 | - | 1 | 96 | 0 | 16 | 32.1 | 4 | 16 | - | - | - | - | - | - | - | - | - | - |",
        "| cuda | forward_kernel | sm_90 | 64 | 2 | 96 | 0 | 0 | 32.1 | 4 | 16 | 300 | 40 | 7.5 | 16 | 8 | 0 | 0 | 2 | 8 "
        "| 0.4 |",
        "| triton | forward_kernel | sm_90 | 64 | 2 | 128 | 24 | 0 | 32.1 | 4 | 8 | - | - | - | - | - | - | - | - | - "
        "| - |",
    ]
    assert "6 kernel/arch rows (4 CUDA, 2 Triton): 1 spill, 1 use local memory, 1 exceed" in table
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{static.README_START}\nstale\n{static.README_END}\ntail\n")
    assert static.update_readme(table, readme) and not static.update_readme(table, readme)
    assert "stale" not in readme.read_text() and readme.read_text().endswith("tail\n")


@pytest.fixture(scope="session")
def cuda_rows(tmp_path_factory):
    """Every CUDA kernel of csrc/ on sm_80 and sm_90, compiled once per test session (bench.static)."""
    if static.find_nvcc() is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin: the CUDA kernels cannot be compiled here")
    if sass.find_tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (PATH, $CUDA_HOME/bin or the triton wheel): no SASS to read")
    return static.cuda_kernel_rows(GATE_ARCHS, jobs=2, build_dir=tmp_path_factory.mktemp("static"))


@pytest.fixture(scope="session")
def triton_rows():
    """Every Triton kernel and autotune config the backend can launch, compiled ahead of time for sm_80 and sm_90."""
    pytest.importorskip("triton")
    rows, status = static.triton_rows(GATE_ARCHS)
    assert rows, status
    return rows


def describe(row: dict) -> str:
    return f"{row['backend']} {row['kernel']}<{row['config']}> sm_{row['arch']}"


@pytest.fixture
def forward_bf16_d64(cuda_rows):
    """The CUDA forward kernels with a tensor-core loop at bfloat16, D = 64 (every variant the launcher picks)."""
    rows = [row for row in cuda_rows if row["direction"] == "forward" and row["hot_loop"]
            and row["dtype"] == "bfloat16" and row["head_dim"] == 64]
    assert rows, "no CUDA forward kernel with an MMA loop at bfloat16, D = 64"
    return rows


def test_every_compiled_cuda_kernel_is_launched_by_a_launcher(cuda_rows):
    assert cuda_rows
    assert [describe(row) for row in cuda_rows if not row["launched"]] == []


def test_positional_visibility_kernels_are_in_the_gate(cuda_rows, triton_rows):
    """Issue 21: the kernels with key/query positions are compiled here, so the spill, shared-memory and hot-loop
    checks below cover them (CUDA: positional_forward_kernel, the backward's kPositions instances; Triton: the
    forward, dK/dV and dQ launched with positions)."""
    assert "positional_forward_kernel" in {row["kernel"] for row in cuda_rows}
    assert {"forward+positions", "dkdv+positions", "dq+positions"} <= {row["kernel"] for row in triton_rows}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_no_kernel_spills_or_uses_local_memory(backend, request):
    rows = request.getfixturevalue(f"{backend}_rows")
    offenders = [f"{describe(row)}: {row['spill_bytes']} B spilled, {static.local_memory(row)} B local memory"
                 for row in rows if row["spill_bytes"] or static.local_memory(row)]
    assert offenders == []


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_shared_memory_fits_every_arch(backend, request):
    assert SM_LIMITS[80].max_shared_per_cta == 163 * 1024 and SM_LIMITS[90].max_shared_per_cta == 227 * 1024
    rows = request.getfixturevalue(f"{backend}_rows")
    offenders = [f"{describe(row)}: {row['shared_bytes']} B" for row in rows
                 if row["shared_bytes"] > SM_LIMITS[row["arch"]].max_shared_per_cta]
    assert offenders == []


def test_cuda_forward_hot_loop_instruction_budget(forward_bf16_d64):
    """<= 10 instructions per MMA; the positional forward <= 11: per score it also compares its key's position with
    its query's and selects (one loop since issue 20: 10.53 / 10.91 with 4 / 2 warps, nvcc 13.0 sm_90)."""
    budget = lambda row: MAX_POSITIONAL_INSTRUCTIONS_PER_MMA if row["kernel"] == "positional_forward_kernel" \
        else MAX_INSTRUCTIONS_PER_MMA
    offenders = [f"{describe(row)}: {row['hot_loop']['instructions_per_mma']} instructions per MMA"
                 for row in forward_bf16_d64 if row["hot_loop"]["instructions_per_mma"] > budget(row)]
    assert offenders == []


def test_cuda_forward_reads_fragments_from_shared_memory_only_by_ldsm(forward_bf16_d64):
    """LDSM in the hot loop, and no HMMA operand last written there by LD, LDS or LDG."""
    offenders = [f"{describe(row)}: {row['hot_loop']['ldsm']} LDSM, "
                 f"{row['hot_loop']['mma_operands_from_plain_loads']} MMA operands from LD/LDS/LDG"
                 for row in forward_bf16_d64
                 if row["hot_loop"]["ldsm"] == 0 or row["hot_loop"]["mma_operands_from_plain_loads"] > 0]
    assert offenders == []


def test_cuda_forward_barriers_per_key_tile(forward_bf16_d64):
    offenders = [f"{describe(row)}: {row['hot_loop']['bar']} BAR" for row in forward_bf16_d64
                 if row["hot_loop"]["bar"] > MAX_BARRIERS_PER_KEY_TILE]
    assert offenders == []


def test_cuda_kernels_reach_8_warps_per_sm_on_h100(cuda_rows):
    rows = [row for row in cuda_rows if row["arch"] == 90]
    assert {row["direction"] for row in rows} >= {"forward", "backward"}
    offenders = [f"{describe(row)}: {row['warps_per_sm']} warps ({row['threads']} threads, {row['registers']} "
                 f"registers, {row['shared_bytes']} B shared)" for row in rows
                 if (row["warps_per_sm"] or 0) < MIN_WARPS_PER_SM_H100]
    assert offenders == []


def test_cuda_combine_keeps_4_loads_in_flight(cuda_rows):
    rows = [row for row in cuda_rows if row["kernel"] == "combine_kernel"]
    assert rows, "no CUDA combine_kernel compiled"
    offenders = [f"{describe(row)}: {row['max_loads_in_flight']} loads in flight" for row in rows
                 if row["max_loads_in_flight"] < MIN_COMBINE_LOADS_IN_FLIGHT]
    assert offenders == []


@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_cuda_hot_loops_have_no_call_or_load_used_before_the_first_mma(cuda_rows, direction):
    rows = [row for row in cuda_rows if row["direction"] == direction and row["hot_loop"]]
    assert rows
    offenders = [f"{describe(row)}: {row['hot_loop']['calls']} CALL, {row['hot_loop']['loads_used_before_mma']} "
                 f"loads used before the first MMA" for row in rows
                 if row["hot_loop"]["calls"] or row["hot_loop"]["loads_used_before_mma"]]
    assert offenders == []


def test_cuda_dkdv_hot_loop_instruction_budget(cuda_rows):
    rows = [row for row in cuda_rows if row["kernel"] == "dkdv_kernel" and row["hot_loop"]
            and row["dtype"] == "bfloat16" and row["head_dim"] == 64]
    assert rows
    offenders = [f"{describe(row)}: {row['hot_loop']['instructions_per_mma']} instructions per MMA" for row in rows
                 if row["hot_loop"]["instructions_per_mma"] > MAX_DKDV_INSTRUCTIONS_PER_MMA]
    assert offenders == []


def _sass(lines):
    from bench import sass
    text = "\n".join(["\tcode for sm_90", "\t\tFunction : k"] +
                     [f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines)])
    return sass.max_loads_in_flight(sass.split_functions(text, 90)[(90, "k")])


def test_max_loads_in_flight_counts_loads_before_their_first_use():
    # the old combine's shape: each load consumed by the next FMA (1 in flight); three independent LDG.128 before
    # a use (3); eight LDGSTS before their DEPBAR (8)
    assert _sass(["LDG.E R4, desc[UR4][R2.64]", "FFMA R6, R4, R5, R6", "LDG.E R4, desc[UR4][R8.64]",
                  "FFMA R6, R4, R5, R6"]) == 1
    assert _sass(["LDG.E.128 R4, desc[UR4][R2.64]", "LDG.E.128 R8, desc[UR4][R2.64+0x10]",
                  "LDG.E.128 R12, desc[UR4][R2.64+0x20]", "FFMA R20, R9, R5, R20", "FFMA R20, R14, R5, R20"]) == 3
    assert _sass([f"LDGSTS.E.BYPASS.128 [R7+{hex(0x100 * i)}], desc[UR4][R{16 + 2 * i}.64]" for i in range(8)] +
                 ["LDGDEPBAR", "DEPBAR.LE SB0, 0x0", "LDS.128 R16, [R7]"]) == 8


def _loop_sass(lines):
    text = "\n".join(["\tcode for sm_90", "\t\tFunction : k"] +
                     [f"        /*{16 * i:04x}*/                   {line} ;" for i, line in enumerate(lines)])
    return sass.count_loop(sass.hot_loop(sass.split_functions(text, 90)[(90, "k")]))


def test_loop_calls_and_loads_used_before_the_first_mma():
    # the backward's key_visible shape: LDG of a mask byte -> FSETP -> @P LDGSTS, all before the MMA (1); a load
    # read only after the MMA (0); a CALL in the loop
    waits = _loop_sass(["LDG.E.U8 R4, desc[UR4][R2.64]", "ISETP.NE.AND P0, PT, R4, RZ, PT",
                        "@P0 LDGSTS.E.BYPASS.128 [R7], desc[UR4][R8.64]", "HMMA.16816.F32.BF16 R12, R16, R20, R12",
                        "@P1 BRA 0x0"])
    assert (waits["loads_used_before_mma"], waits["calls"]) == (1, 0)
    overlapped = _loop_sass(["LDG.E.U8 R4, desc[UR4][R2.64]", "CALL.REL.NOINC 0x100",
                             "HMMA.16816.F32.BF16 R12, R16, R20, R12", "ISETP.NE.AND P0, PT, R4, RZ, PT",
                             "@P1 BRA 0x0"])
    assert (overlapped["loads_used_before_mma"], overlapped["calls"]) == (0, 1)
