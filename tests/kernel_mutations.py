"""Mutation check of the CUDA kernel tests (and the Triton split tests): plants one known bug at a time in a
copy of the tree and runs the emulated cuda tests, which must fail for every bug. Proves the emulator and the tests can
catch dropped waits and barriers, wrong math, overruns and unwritten outputs.

    python tests/kernel_mutations.py            # every mutation (a few minutes on 2 cores)
    python tests/kernel_mutations.py --list
    python tests/kernel_mutations.py --only "dropped wait"

A mutation whose source text no longer exists is reported as stale (the kernels changed): update it.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# the 128-row-CTA cases first: the quickest to fail for a bug in the forward's warp math
KERNEL_TESTS = ["tests/test_forward_tall_tiles.py", "tests/test_co_attention.py", "tests/test_concat_attention.py",
                "tests/test_cuda_extension.py", "-k", "cuda and not valgrind"]
BOUNDS_TEST = ["tests/test_cuda_extension.py", "-k", "valgrind"]
BACKWARD_TESTS = ["tests/test_cuda_extension.py", "-k", "backward"]
TRITON_SPLIT_TESTS = ("tests/test_co_attention.py", "-k", "triton and split")
GROUPED_CUDA_TESTS = ("tests/test_grouped_heads.py", "-k", "cuda")
POSITIONS_CUDA_TESTS = ("tests/test_positions.py", "-k", "cuda")
# the (Hq, Hkv) = (14, 2) cases (heads4) on the Triton interpreter
GROUPED_TRITON_TESTS = ("tests/test_grouped_heads.py", "-k", "triton and heads4 and not deterministic")
# positional visibility on the Triton interpreter: float32, Hq = Hkv forward/backward scenarios, forced splits,
# the deterministic dQ and NaN queries that see no key
TRITON_POSITION_TESTS = ("tests/test_positions.py", "-k",
                         "triton and not dtype1 and not dtype3 and (heads0 or splits or deterministic or nan)")


@dataclass(frozen=True)
class Mutation:
    name: str
    path: str
    original: str
    planted: str
    tests: tuple = tuple(KERNEL_TESTS)


MUTATIONS = [
    Mutation("forward: skipped pipeline wait for the current K/V tile", "csrc/forward.cuh",
             "    __pipeline_wait_prior(0);\n    __syncthreads();\n    word = next_word;",
             "    __syncthreads();\n    word = next_word;"),
    Mutation("forward: dropped tile barrier", "csrc/forward.cuh",
             "    __syncthreads();\n    word = next_word;\n", "    word = next_word;\n"),
    Mutation("forward: output not rescaled by the new maximum", "csrc/forward_warp.cuh",
             "        out[n][2 * r] *= alpha;\n        out[n][2 * r + 1] *= alpha;\n", ""),
    Mutation("forward: wrong lane in a fragment (Q rows of the next quad)", "csrc/forward_warp.cuh",
             "const int64_t row = row0 + 16 * block + lane_quad(lane) + 8 * (i % 2);",
             "const int64_t row = row0 + 16 * block + lane_quad(lane ^ 4) + 8 * (i % 2);"),
    Mutation("forward: swizzle not undone when reading K", "csrc/forward_warp.cuh",
             "keys + swizzled_offset<D>(16 * n16 + x4_row_b(lane), 16 * ks + x4_col_b(lane))",
             "keys + ((16 * n16 + x4_row_b(lane)) * D + 16 * ks + x4_col_b(lane)) * 2"),
    Mutation("forward: missing quad-shuffle step of the row maximum", "csrc/forward_warp.cuh",
             "      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));\n", ""),
    Mutation("forward: a 128-row tile's second warp row-block reading the first one's max (and sum)",
             "csrc/forward_warp.cuh", "RunningSoftmax& row = warp.rows[2 * block + r];",
             "RunningSoftmax& row = warp.rows[r];"),
    Mutation("forward: a 128-row tile's second warp row-block loading the first one's Q rows", "csrc/forward_warp.cuh",
             "const int64_t row = row0 + 16 * block + lane_quad(lane) + 8 * (i % 2);",
             "const int64_t row = row0 + lane_quad(lane) + 8 * (i % 2);"),
    Mutation("forward: a 128-row warp's second row block reading the first one's Q rows from shared memory",
             "csrc/forward_warp.cuh", "rows + swizzled_offset<D>(16 * block + x4_row(lane), 16 * ks + x4_col(lane))",
             "rows + swizzled_offset<D>(x4_row(lane), 16 * ks + x4_col(lane))"),
    Mutation("forward: Q staged in shared memory without the sign of a negative scale", "csrc/forward_warp.cuh",
             "      chunk = make_uint4(chunk.x ^ sign, chunk.y ^ sign, chunk.z ^ sign, chunk.w ^ sign);\n", ""),
    Mutation("forward: Q staged in shared memory unswizzled", "csrc/forward_warp.cuh",
             "*reinterpret_cast<uint4*>(rows + swizzled_offset<D>(row, col)) = chunk;",
             "*reinterpret_cast<uint4*>(rows + (row * D + col) * 2) = chunk;"),
    Mutation("forward: staged Q rows read before the warp's other lanes wrote them (no __syncwarp)",
             "csrc/forward_warp.cuh", "    *reinterpret_cast<uint4*>(rows + swizzled_offset<D>(row, col)) = chunk;\n  }\n  __syncwarp();",
             "    *reinterpret_cast<uint4*>(rows + swizzled_offset<D>(row, col)) = chunk;\n  }"),
    Mutation("concatenated keys: the second source's first key taken for the first source's (forward tiles)",
             "csrc/key_tiles.h", "return static_cast<int>(key >= s1) +", "return static_cast<int>(key > s1) +"),
    Mutation("forward: one key past the split visible", "csrc/forward.cuh",
             "const uint64_t last_word = keys_below(hi - lo - int64_t{tiles - 1} * kBlockN);",
             "const uint64_t last_word = keys_below(hi - lo - int64_t{tiles - 1} * kBlockN + 1);"),
    Mutation("forward: a key tile skipped that was not fully masked (one kept key taken for none)",
             "csrc/forward_loads.cuh", "bool no_key_visible(uint64_t word) { return word == 0; }",
             "bool no_key_visible(uint64_t word) { return (word & (word - 1)) == 0; }"),
    Mutation("forward: visibility word of the next key tile, not the one after", "csrc/forward.cuh",
             "fetch_tile_word(words, t + 2, tiles, word_slots);", "fetch_tile_word(words, t + 1, tiles, word_slots);"),
    Mutation("forward: key tile words of the next batch row", "csrc/key_tile_words.cuh",
             "key_tile_word(args, keys, i / tiles, i % tiles * kBlockN)",
             "key_tile_word(args, keys, (i / tiles + 1) % args.batch, i % tiles * kBlockN)"),
    Mutation("forward: last split stops at split_size (the merged sliver of keys dropped)", "csrc/forward.cuh",
             "const int64_t hi = blockIdx.y + 1 == args.num_splits ? keys.total : min(lo + args.split_size, keys.total);",
             "const int64_t hi = min(lo + args.split_size, keys.total);"),
    Mutation("combine: a split whose lse is not rescaled", "csrc/combine.cuh",
             "const float w_lo = lane < splits ? merge_weight(lse_lo, lse_max) : 0.0f;",
             "const float w_lo = lane < splits ? 1.0f : 0.0f;"),
    Mutation("mask: one key past the tile visible", "csrc/kernel_utils.cuh",
             "if (key >= tile.end) return false;", "if (key > tile.end) return false;"),
    Mutation("combine: last split dropped", "csrc/combine.cuh",
             "if (s0 + i < splits) {\n          const float w", "if (s0 + i + 1 < splits) {\n          const float w"),
    Mutation("combine: weight of the wrong split", "csrc/combine.cuh",
             "const float w = weights[s0 + i];", "const float w = weights[s0 + (i + 1) % kCombineBatch];"),
    Mutation("combine: partials read before their copies land (skipped wait)", "csrc/combine.cuh",
             "      __pipeline_wait_prior(0);  // a lane reads back only its own copies\n", ""),
    Mutation("combine: weights read before the warp's stores are visible", "csrc/combine.cuh",
             "  weights[lane + 32] = w_hi * normalizer;\n  __syncwarp();\n", "  weights[lane + 32] = w_hi * normalizer;\n"),
    Mutation("backward: dropped barrier before the dQ product reads the staged dS^T", "csrc/backward.cuh",
             "stage_dscores(smem + Smem::dscores, key0, ds_frags);\n      __syncthreads();\n",
             "stage_dscores(smem + Smem::dscores, key0, ds_frags);\n", tuple(BACKWARD_TESTS)),
    Mutation("backward: skipped cp.async wait of the two-stage pipeline (dK/dV query stages)",
             "csrc/backward.cuh", "  __pipeline_wait_prior(0);\n  __syncthreads();\n  if (t + 1 < count)",
             "  __syncthreads();\n  if (t + 1 < count)", tuple(BACKWARD_TESTS)),
    Mutation("backward: dQ kernel's next K/V tile loaded into the stage being read", "csrc/backward.cuh",
             "issue_dq_key_tile<T, D>(args, keys, next, smem, stage, buffer, b, kv_h);",
             "issue_dq_key_tile<T, D>(args, keys, next, smem, 1 - stage, buffer, b, kv_h);", tuple(BACKWARD_TESTS)),
    Mutation("backward: dQ kernel's skipped cp.async wait for its K/V tile", "csrc/backward.cuh",
             "  __pipeline_wait_prior(0);\n  store_pending_key", "  store_pending_key", tuple(BACKWARD_TESTS)),
    Mutation("backward: dQ kernel's dropped barrier (a key buffer or stage read while it is refilled)",
             "csrc/backward.cuh", "  } else {\n    __syncthreads();\n  }\n  if (t + 1 < count && next_seen)",
             "  }\n  if (t + 1 < count && next_seen)", tuple(BACKWARD_TESTS)),
    Mutation("backward: dK/dV kernel's next query stage loaded into the stage being read", "csrc/backward.cuh",
             "issue_query_tile<T, D>(args, smem, stage, b, ahead,",
             "issue_query_tile<T, D>(args, smem, 1 - stage, b, ahead,", tuple(BACKWARD_TESTS)),
    Mutation("backward: dlse ignored in delta", "csrc/backward.cuh",
             "sum - (args.dlse != nullptr ? args.dlse[row] : 0.0f)", "sum"),
    Mutation("backward: dK/dV row slot of step t + 2 filled with step t + 1's lse, delta and positions",
             "csrc/backward.cuh", "row_slot(next + 1), b, ahead.next(args.q_len));", "row_slot(next + 1), b, ahead);",
             GROUPED_CUDA_TESTS),  # steps >= 3: a group of query heads
    Mutation("backward: dK/dV liveness of the next query tile read from the current tile's row slot",
             "csrc/backward.cuh", "smem + Smem::lse + row_slot(next) * Smem::kRows",
             "smem + Smem::lse + row_slot(next - 1) * Smem::kRows", tuple(BACKWARD_TESTS)),
    Mutation("backward: dK/dV Q of a row without keys (or past the end) not zeroed", "csrc/dkdv_queries.cuh",
             "      *reinterpret_cast<uint4*>(query_tile + offset) = make_uint4(0u, 0u, 0u, 0u);\n", "",
             tuple(BACKWARD_TESTS)),
    Mutation("backward: dK/dV probability kept for a query row without keys", "csrc/dkdv_queries.cuh",
             "return visible[i / 2] && live;", "return visible[i / 2];", tuple(BACKWARD_TESTS)),
    Mutation("backward: dropped barrier of the two-stage pipeline (dK/dV query stages)",
             "csrc/backward.cuh", "  __pipeline_wait_prior(0);\n  __syncthreads();\n  if (t + 1 < count)",
             "  __pipeline_wait_prior(0);\n  if (t + 1 < count)", tuple(BACKWARD_TESTS)),
    Mutation("backward: dS^T staged at another lane's key row", "csrc/dkdv_queries.cuh",
             "const int row = key0 + lane_quad(lane) + 8 * (i % 2);",
             "const int row = key0 + lane_quad(lane ^ 4) + 8 * (i % 2);", tuple(BACKWARD_TESTS)),
    Mutation("backward: A-fragment registers 1 and 2 swapped in P^T and dS^T (and the forward's P)", "csrc/mma.cuh",
             "a[1] = pack_b16x2<T>(left[2], left[3]);\n  a[2] = pack_b16x2<T>(right[0], right[1]);",
             "a[2] = pack_b16x2<T>(left[2], left[3]);\n  a[1] = pack_b16x2<T>(right[0], right[1]);", tuple(BACKWARD_TESTS)),
    Mutation("backward: dropped dQ atomic of the last head-column tile", "csrc/dkdv_queries.cuh",
             "for (int nt = 0; nt < kHalfTiles; ++nt) {\n      atomic_add_pair", "for (int nt = 0; nt + 1 < kHalfTiles; ++nt) {\n      atomic_add_pair", tuple(BACKWARD_TESTS)),
    Mutation("backward: masked keys loaded instead of selected out (dK/dV kernel)", "csrc/backward.cuh",
             "smem + Smem::keys, smem + Smem::values, visible_key);",
             "smem + Smem::keys, smem + Smem::values, [&](int n) { return n < tile.end - tile.start; });",
             tuple(BACKWARD_TESTS)),
    Mutation("backward: masked keys loaded instead of selected out (dQ kernel)", "csrc/backward.cuh",
             "[&](int n) { return visible[n] != 0; });",
             "[&](int n) { return n < keys.tile(t).end - keys.tile(t).start; });", tuple(BACKWARD_TESTS)),
    Mutation("backward: dK/dV written one key past the tile", "csrc/backward_keys.cuh",
             "    if (row < valid) {\n      const KeyRow at", "    if (row <= valid) {\n      const KeyRow at",
             tuple(BOUNDS_TEST)),
    Mutation("backward: a spanned key tile drops the first key of the second source (K/V rows, dK/dV and dQ)",
             "csrc/backward_keys.cuh", "    if (!keep(row)) {",
             "    if (!keep(row) || (!one_source && row > 0 && keys.locate(tile.start + row).row == 0)) {",
             tuple(BACKWARD_TESTS)),
    Mutation("backward: a spanned key tile never writes the dK of the second source's first key",
             "csrc/backward_keys.cuh",
             "      *reinterpret_cast<uint4*>(element<T>(source.dk, b, at.row, h) + col) =",
             "      if (row == 0 || at.row != 0) *reinterpret_cast<uint4*>(element<T>(source.dk, b, at.row, h) + col) =",
             tuple(BACKWARD_TESTS)),
    Mutation("backward: dQ kernel's spanned tile hides the first key of the second source", "csrc/visibility.cuh",
             "return pending_key(args.sources[at.source], b, at.row, key < tile.end);",
             "return pending_key(args.sources[at.source], b, at.row, key < tile.end && (key == tile.start || at.row != 0));",
             tuple(BACKWARD_TESTS)),
    Mutation("backward: dQ kernel's prefetched key visibility of the wrong tile (the next, not the one after)",
             "csrc/backward.cuh", "    pending = pending_of(t + 2);", "    pending = pending_of(t + 1);",
             tuple(BACKWARD_TESTS)),
    Mutation("forward: lse of the last row never written", "csrc/forward_warp.cuh",
             "if (lane_in_quad(lane) == 0 && m < args.q_len) {",
             "if (lane_in_quad(lane) == 0 && m + 1 < args.q_len) {", tuple(BOUNDS_TEST)),
    Mutation("grouped heads: CUDA forward maps query head h to K/V head h % Hkv (not h / group)", "csrc/forward.cuh",
             "const int64_t kv_h = h / args.kv_group();", "const int64_t kv_h = h % args.kv_head_count();",
             GROUPED_CUDA_TESTS),
    Mutation("grouped heads: CUDA dQ kernel maps query head h to K/V head h % Hkv", "csrc/backward.cuh",
             "const int64_t kv_h = h / args.kv_group();", "const int64_t kv_h = h % args.kv_head_count();",
             GROUPED_CUDA_TESTS),
    Mutation("grouped heads: CUDA dK/dV group sum drops the group's last query head", "csrc/backward.cuh",
             "const int64_t steps = group * query_tiles;",
             "const int64_t steps = (group > 1 ? group - 1 : group) * query_tiles;", GROUPED_CUDA_TESTS),
    Mutation("grouped heads: CUDA dK/dV of a K/V head summed over the next head's group", "csrc/backward.cuh",
             "const QueryStep first{kv_h * group, 0};", "const QueryStep first{((kv_h + 1) * group) % args.heads, 0};",
             GROUPED_CUDA_TESTS),
    Mutation("grouped heads: Triton forward maps query head h to K/V head h % Hkv",
             "mplug_kernels/ops/triton_forward.py",
             "hk = h // kv_group", "hk = h % (num_heads // kv_group)", GROUPED_TRITON_TESTS),
    Mutation("grouped heads: Triton dK/dV group sum drops the group's last query head",
             "mplug_kernels/ops/triton_backward.py", "for g in range(0, kv_group):",
             "for g in range(0, kv_group - (kv_group > 1)):", GROUPED_TRITON_TESTS),
    Mutation("triton forward: last split stops at split_size (the merged sliver of keys dropped)",
             "mplug_kernels/ops/triton_forward.py",
             "split_hi = tl.where(pid_split == num_splits - 1, L0 + L1 + L2 + L3, split_lo + split_size)",
             "split_hi = split_lo + split_size", TRITON_SPLIT_TESTS),
    Mutation("positions: CUDA forward sees a key only strictly before its query (<= became <)", "csrc/visibility.cuh",
             "static_cast<int32_t>(i % 2 == 0 ? key.x : key.y) <= row[i / 2];",
             "static_cast<int32_t>(i % 2 == 0 ? key.x : key.y) < row[i / 2];", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward gives row g + 8 the query position of row g", "csrc/visibility.cuh",
             "const int32_t row[2] = {rows[lane_quad(lane)], rows[lane_quad(lane) + 8]};",
             "const int32_t row[2] = {rows[lane_quad(lane)], rows[lane_quad(lane)]};", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward skips key tiles by the CTA's first query position, not its largest",
             "csrc/forward_positions.cuh", "for (int r = 0; r < kRows; ++r) largest =",
             "for (int r = 0; r < 1; ++r) largest =", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward takes the unmasked path when only the warp's even keys are all seen",
             "csrc/forward_positions.cuh",
             "static_cast<int32_t>(key.x) <= warp_min &&\n                    static_cast<int32_t>(key.y) <= warp_min;",
             "static_cast<int32_t>(key.x) <= warp_min;", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward reads the warp's stamp slot before every lane has written it (no __syncwarp)",
             "csrc/forward_positions.cuh", "  if (!seen) *slot = stamp;\n  __syncwarp();\n",
             "  if (!seen) *slot = stamp;\n", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward stamps the warp's slot from the lanes that see their keys", "csrc/forward_positions.cuh",
             "  if (!seen) *slot = stamp;", "  if (seen) *slot = stamp;", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA forward loads the key positions of the next tile, not the one after", "csrc/forward_positions.cuh",
             "pending = split_pending_key<kThreadsHere>(args, keys, b, lo + int64_t{t + 2} * kBlockN, hi);",
             "pending = split_pending_key<kThreadsHere>(args, keys, b, lo + int64_t{t + 1} * kBlockN, hi);",
             POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA dK/dV hides a key from the query at its own position", "csrc/dkdv_queries.cuh",
             "key_positions[i / 2] <= static_cast<int32_t>(i % 2 == 0 ? positions.x : positions.y);",
             "key_positions[i / 2] < static_cast<int32_t>(i % 2 == 0 ? positions.x : positions.y);", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA deterministic dQ hides a key from the query at its own position", "csrc/backward.cuh",
             "positions[nt * kMmaN + acc_col(lane, i)] > row_positions[i / 2]; });",
             "positions[nt * kMmaN + acc_col(lane, i)] >= row_positions[i / 2]; });", POSITIONS_CUDA_TESTS),
    Mutation("positions: CUDA backward skips key tiles by the first query position, not the largest",
             "csrc/visibility.cuh", "for (int64_t r = threadIdx.x; r < rows; r += kThreadsHere) {",
             "for (int64_t r = threadIdx.x; r < 1; r += kThreadsHere) {", POSITIONS_CUDA_TESTS),
    *[Mutation(f"triton positions: {name}", f"mplug_kernels/ops/triton_{path}.py", original, planted,
               TRITON_POSITION_TESTS) for name, path, original, planted in [
        ("a key visible only if its position < the query's (not <=)", "tiles",
         "ok = ok & (kpos[None, :] <= qpos[:, None])", "ok = ok & (kpos[None, :] < qpos[:, None])"),
        ("every batch row reads row 0's query positions", "tiles",
         "tl.load(QPOS + b * stride_qpb + offs_m,", "tl.load(QPOS + offs_m,"),
        ("tile skip compares the tile's max key position (not min)", "tiles",
         "return tl.min(kpos, 0) <= qpos_max", "return tl.max(kpos, 0) <= qpos_max"),
        ("forward tile skip against the query block's min position (not max)", "forward",
         "        qpos_max = tl.max(qpos, 0)\n\n    acc", "        qpos_max = tl.min(qpos, 0)\n\n    acc"),
        ("backward keeps the q rows that see no key (NaN reaches dK)", "tiles",
         'q = tl.where((lse == float("-inf"))[:, None], 0.0, q)', "q = q"),
        ("dK/dV's batch-row max position skips the first query tile (K/V not loaded)", "backward",
         "top = tl.full([BLOCK_M], -2147483647, dtype=tl.int32)\n    for start_m in range(0, q_len, BLOCK_M):",
         "top = tl.full([BLOCK_M], -2147483647, dtype=tl.int32)\n    for start_m in range(BLOCK_M, q_len, BLOCK_M):"),
        ("deterministic dQ kernel drops the positional mask of the tiles it computes", "backward",
         "qk_scale, HAS_MASK, True, PRECISION)", "qk_scale, HAS_MASK, False, PRECISION)"),
        ("combine of a row whose every split is -inf (sees no key) unguarded", "forward",
         'max_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)', "max_safe = lse_max"),
    ]],
]


def check(mutation: Mutation, python: str) -> str:
    """'caught', 'MISSED' or 'stale' for one mutation, run in a temporary copy of the tree."""
    with tempfile.TemporaryDirectory() as scratch:
        tree = Path(scratch) / "tree"
        shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".venv", "build", ".git", "__pycache__"))
        target = tree / mutation.path
        text = target.read_text()
        if mutation.original not in text:
            return "stale"
        target.write_text(text.replace(mutation.original, mutation.planted, 1))
        result = subprocess.run([python, "-m", "pytest", *mutation.tests, "-x", "-q", "-p", "no:cacheprovider"],
                                cwd=tree, capture_output=True, text=True)
        return "caught" if result.returncode != 0 else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args()
    selected = [m for m in MUTATIONS if args.only is None or args.only in m.name]
    if args.list:
        print("\n".join(m.name for m in selected))
        return 0
    outcomes = {}
    for mutation in selected:
        outcomes[mutation.name] = check(mutation, sys.executable)
        print(f"{outcomes[mutation.name]:>7}  {mutation.name}", flush=True)
    return 0 if all(outcome == "caught" for outcome in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
