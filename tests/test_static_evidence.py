"""Static GPU evidence: the SASS reader (bench/sass.py) on hand-written SASS, and the CI gate on every kernel
compiled ahead of time by bench.static (nvcc for sm_80 and sm_90, Triton via bench/static_triton.py).

The gate holds at issue 10's targets: no kernel spills or uses local memory; shared memory fits sm_80
(163 KB) and sm_90 (227 KB); the CUDA forward's hot loop (bf16, D = 64, sm_90) issues <= 10 instructions
per MMA, has <= 2 barriers per key tile and reads its MMA fragments from shared memory only by LDSM; the
CUDA forward and backward reach >= 8 warps per SM on an H100.
"""
from bench import sass

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
        "sts": 0, "bar": 1, "mma_operands_from_plain_loads": 1, "instructions_per_mma": 5.5,
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
