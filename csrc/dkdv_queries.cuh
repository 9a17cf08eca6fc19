// The query side of the dK/dV kernel (backward.cuh): its shared memory, the pipeline that brings
// each step's query tile (lse, delta and query positions a step ahead of Q and dO, so that which
// rows load is read from shared memory, never waited for in global memory), and one warp's
// products of its 16 keys with a query tile, dQ by atomics included.
#pragma once

#include "visibility.cuh"
#include "warp_tiles.cuh"

namespace mplug {
namespace backward {

constexpr int kBackwardKeys = kKeysPerTile;            // keys per dK/dV CTA, 16 per warp
constexpr int kBackwardQueries = 32;                   // query rows per dK/dV pipeline step
constexpr int kQueryTiles = kBackwardQueries / kMmaN;  // 8-column accumulator tiles of S^T
constexpr int kRowSlots = 4;  // ring of per-row slots (3 in use: being read, deciding liveness, landing)
static_assert(kBackwardKeys == kWarps * kMmaM, "each warp owns 16 keys of the dK/dV tile");
static_assert(kBackwardQueries <= kThreads, "one thread per query row copies its lse and delta");

// Byte offsets of the dK/dV kernel's shared memory: swizzled K and V tiles, two stages of Q and dO,
// kRowSlots slots of lse and delta, and dS^T [keys, queries] for the atomic dQ. After the loop the
// K and V tiles hold the finished dK and dV on their way to global memory.
template <int D>
struct DkdvSmem {
  static constexpr size_t kKeyTile = kBackwardKeys * D * 2;
  static constexpr size_t kQueryTile = kBackwardQueries * D * 2;
  static constexpr size_t kRows = kBackwardQueries * sizeof(float);
  static constexpr size_t keys = 0;
  static constexpr size_t values = keys + kKeyTile;
  static constexpr size_t queries = values + kKeyTile;  // stage s at queries + s * kQueryTile
  static constexpr size_t douts = queries + 2 * kQueryTile;
  static constexpr size_t lse = douts + 2 * kQueryTile;  // slot s at lse + s * kRows
  static constexpr size_t delta = lse + kRowSlots * kRows;
  static constexpr size_t dscores = delta + kRowSlots * kRows;
  static constexpr size_t bytes = dscores + kBackwardKeys * kBackwardQueries * 2;
  static constexpr size_t query_positions = bytes;  // int32, as lse: the kPositions kernel only
  static constexpr size_t positional_bytes = query_positions + kRowSlots * kRows;
};

// The row slot of pipeline step t.
__device__ __forceinline__ int row_slot(int64_t t) { return static_cast<int>(t & (kRowSlots - 1)); }

// A dK/dV pipeline step's query tile: query head h of the K/V head's group, first row m0.
struct QueryStep {
  int64_t h;
  int64_t m0;

  // The step after this one: the head's next query tile, else the next head's first.
  __device__ __forceinline__ QueryStep next(int64_t q_len) const {
    return m0 + kBackwardQueries < q_len ? QueryStep{h, m0 + kBackwardQueries} : QueryStep{h + 1, 0};
  }
};

// Starts copying lse, delta (and query positions) of the step's rows into row slot `slot`, a step
// ahead of their Q and dO; rows past the end get lse -inf (no keys), delta 0 and position INT32_MIN.
template <int D, bool kPositions>
__device__ __forceinline__ void issue_query_rows(const AttentionArgs& args, unsigned char* smem, int slot, int64_t b,
                                                 const QueryStep& step) {
  using Smem = DkdvSmem<D>;
  const int r = threadIdx.x;
  if (r >= kBackwardQueries) return;
  float* lse = reinterpret_cast<float*>(smem + Smem::lse + slot * Smem::kRows);
  float* delta = reinterpret_cast<float*>(smem + Smem::delta + slot * Smem::kRows);
  int32_t* positions = reinterpret_cast<int32_t*>(smem + Smem::query_positions + slot * Smem::kRows);
  const int64_t m = step.m0 + r;
  if (m < args.q_len) {
    const int64_t row = (b * args.heads + step.h) * args.q_len + m;
    __pipeline_memcpy_async(lse + r, args.lse + row, sizeof(float));
    __pipeline_memcpy_async(delta + r, args.delta + row, sizeof(float));
    if constexpr (kPositions) {
      __pipeline_memcpy_async(positions + r, args.query_positions + b * args.query_positions_stride_b + m,
                              sizeof(int32_t));
    }
  } else {
    lse[r] = -INFINITY;
    delta[r] = 0.0f;
    if constexpr (kPositions) positions[r] = INT32_MIN;
  }
}

// Starts loading Q and dO of the step's rows into stage `stage`: the rows live(r) keeps by cp.async,
// the others (past the end, or seeing no key) as zeros, so what they hold reaches no MMA. Thread x
// copies 16-byte chunk x % (D / 8) of rows x / (D / 8) + k kRowsPerPass (threads past the last whole
// row of chunks idle).
template <typename T, int D, typename Live>
__device__ __forceinline__ void issue_query_tile(const AttentionArgs& args, unsigned char* smem, int stage, int64_t b,
                                                 const QueryStep& step, const Live& live) {
  using Smem = DkdvSmem<D>;
  constexpr int kChunks = D / 8;
  constexpr int kRowsPerPass = kThreads / kChunks;
  const int first_row = threadIdx.x / kChunks;
  const int col = (threadIdx.x % kChunks) * 8;
  if (first_row >= kRowsPerPass) return;
  const T* queries = element<const T>(args.q, b, step.m0 + first_row, step.h) + col;
  const T* douts = element<const T>(args.dout, b, step.m0 + first_row, step.h) + col;
  unsigned char* query_tile = smem + Smem::queries + stage * Smem::kQueryTile;
  unsigned char* dout_tile = smem + Smem::douts + stage * Smem::kQueryTile;
#pragma unroll
  for (int pass = 0; pass < (kBackwardQueries + kRowsPerPass - 1) / kRowsPerPass; ++pass) {
    const int row = first_row + pass * kRowsPerPass;
    if (kBackwardQueries % kRowsPerPass != 0 && row >= kBackwardQueries) break;
    const uint32_t offset = swizzled_offset<D>(row, col);
    if (live(row)) {
      __pipeline_memcpy_async(query_tile + offset, queries + pass * kRowsPerPass * args.q.stride_s, 16);
      __pipeline_memcpy_async(dout_tile + offset, douts + pass * kRowsPerPass * args.dout.stride_s, 16);
    } else {
      *reinterpret_cast<uint4*>(query_tile + offset) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(dout_tile + offset) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// dS^T (rounded, as A fragments) into the swizzled [keys, queries] tile, at the warp's 16 key rows.
__device__ __forceinline__ void stage_dscores(unsigned char* tile, int key0, const uint32_t (&ds)[kQueryTiles / 2][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < kQueryTiles / 2; ++ks) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // register i of an A fragment: row g + 8 (i % 2), columns 2t + 8 (i / 2) + {0, 1}
      const int row = key0 + lane_quad(lane) + 8 * (i % 2);
      const int col = ks * kMmaK + 2 * lane_in_quad(lane) + 8 * (i / 2);
      *reinterpret_cast<uint32_t*>(tile + swizzled_offset<kBackwardQueries>(row, col)) = ds[ks][i];
    }
  }
}

// address[0..1] += (x, y): one 8-byte atomic where the arch has it (sm_90), else two 4-byte ones.
__device__ __forceinline__ void atomic_add_pair(float* address, float x, float y) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(address), make_float2(x, y));
#else
  atomicAdd(address, x);
  atomicAdd(address + 1, y);
#endif
}

// Adds scale * dS K of the current query tile to the float32 dQ accumulator in global memory: warp
// w computes query rows 16 (w % 2).. and head columns (w / 2) D / 2.. from the staged dS^T and K.
template <typename T, int D>
__device__ __forceinline__ void accumulate_dq_atomic(const AttentionArgs& args, const unsigned char* dscores,
                                                     const unsigned char* keys, int64_t b, const QueryStep& step) {
  constexpr int kHalfTiles = D / 2 / kMmaN;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int row0 = kMmaM * (warp % 2);
  const int col0 = (warp / 2) * (D / 2);
  uint32_t ds[kBackwardKeys / kMmaK][4];
#pragma unroll
  for (int ks = 0; ks < kBackwardKeys / kMmaK; ++ks) {
    // dS [queries, keys] is stored transposed: matrix i = lane / 8 holds keys 8 (i / 2).. and queries 8 (i % 2)..
    const int key = ks * kMmaK + lane % 8 + 8 * (lane / 16);
    const int query = row0 + 8 * ((lane / 8) % 2);
    ldmatrix_trans<4>(ds[ks], dscores + swizzled_offset<kBackwardQueries>(key, query));
  }
  float dq[kHalfTiles][4];
  zero_accumulators(dq);
  warp_accumulate<T, D, kHalfTiles, kBackwardKeys / kMmaK>(dq, ds, keys, 0, col0);
  const int64_t row_stride = args.heads * D;  // dq_accum is [B, Lq, H, D]
  float* tile = args.dq_accum + ((b * args.q_len + step.m0) * args.heads + step.h) * D + col0 + acc_col(lane, 0);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + acc_row(lane, 2 * half);
    if (step.m0 + r >= args.q_len) continue;
    float* row = tile + r * row_stride;
#pragma unroll
    for (int nt = 0; nt < kHalfTiles; ++nt) {
      atomic_add_pair(row + nt * kMmaN, dq[nt][2 * half] * args.scale, dq[nt][2 * half + 1] * args.scale);
    }
  }
}

// Whether the warp's key of accumulator row i / 2 and the query of column pair element i % 2 (lse,
// position: the column pair's) meet: the key visible, the query seeing some key and, under
// positions, the key positioned at or before the query.
template <bool kPositions>
__device__ __forceinline__ bool pair_kept(int i, const bool (&visible)[2], const int32_t (&key_positions)[2],
                                          float2 lse, uint2 positions) {
  const bool live = (i % 2 == 0 ? lse.x : lse.y) != -INFINITY;
  if constexpr (kPositions) {
    return visible[i / 2] && live && key_positions[i / 2] <= static_cast<int32_t>(i % 2 == 0 ? positions.x : positions.y);
  }
  return visible[i / 2] && live;
}

// The warp's dK^T/dV^T products of one query step: S^T and dP^T [16 keys, 32 queries] from K, V
// (rows key0..) and the stage's Q and dO; P^T and dS^T, selected to 0 where key and query do not
// meet; then dV += P^T dO, dK += dS^T Q; dS^T rounded to T is returned for the dQ product.
template <typename T, int D, bool kPositions>
__device__ __forceinline__ void dkdv_stage(const AttentionArgs& args, const unsigned char* smem, int stage, int slot,
                                           int key0, const bool (&visible)[2], const int32_t (&key_positions)[2],
                                           float (&dk)[D / kMmaN][4], float (&dv)[D / kMmaN][4],
                                           uint32_t (&ds_frags)[kQueryTiles / 2][4]) {
  using Smem = DkdvSmem<D>;
  const int lane = threadIdx.x % 32;
  const unsigned char* queries = smem + Smem::queries + stage * Smem::kQueryTile;
  const unsigned char* douts = smem + Smem::douts + stage * Smem::kQueryTile;
  const float* lse = reinterpret_cast<const float*>(smem + Smem::lse + slot * Smem::kRows);
  const float* delta = reinterpret_cast<const float*>(smem + Smem::delta + slot * Smem::kRows);
  const int32_t* positions = reinterpret_cast<const int32_t*>(smem + Smem::query_positions + slot * Smem::kRows);
  float scores[kQueryTiles][4];
  float dprobs[kQueryTiles][4];
  warp_rows_product<T, D, kQueryTiles>(scores, smem + Smem::keys, key0, queries);
  warp_rows_product<T, D, kQueryTiles>(dprobs, smem + Smem::values, key0, douts);
  const float scale_log2 = args.scale * kLog2e;
#pragma unroll
  for (int nt = 0; nt < kQueryTiles; ++nt) {
    const int m = nt * kMmaN + acc_col(lane, 0);  // the lane's column pair m, m + 1
    const float2 row_lse = *reinterpret_cast<const float2*>(lse + m);
    const float2 row_delta = *reinterpret_cast<const float2*>(delta + m);
    const uint2 row_positions = kPositions ? *reinterpret_cast<const uint2*>(positions + m) : make_uint2(0u, 0u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool keep = pair_kept<kPositions>(i, visible, key_positions, row_lse, row_positions);
      const float offset = (i % 2 == 0 ? row_lse.x : row_lse.y) * kLog2e;
      const float p = keep ? exp2_approx(scores[nt][i] * scale_log2 - offset) : 0.0f;
      scores[nt][i] = p;
      dprobs[nt][i] = keep ? p * (dprobs[nt][i] - (i % 2 == 0 ? row_delta.x : row_delta.y)) : 0.0f;
    }
  }
  uint32_t p_frags[kQueryTiles / 2][4];
  to_a_fragments<T, kQueryTiles>(p_frags, scores);
  to_a_fragments<T, kQueryTiles>(ds_frags, dprobs);
  warp_accumulate<T, D, D / kMmaN, kQueryTiles / 2>(dv, p_frags, douts, 0, 0);
  warp_accumulate<T, D, D / kMmaN, kQueryTiles / 2>(dk, ds_frags, queries, 0, 0);
}

}  // namespace backward
}  // namespace mplug
