// Positional visibility, shared by the forward and backward kernels: key j of source s is visible to
// query m of batch row b iff sources[s].positions[b, j] <= query_positions[b, m] and its padding mask
// keeps it (a source without positions: every query). Invisible scores are selected out (set to -inf,
// or their probability and dS to 0), never multiplied, so what an invisible key holds reaches nothing.
#pragma once

#include <climits>

#include "mma.cuh"

namespace mplug {

// The position of key j of `source` in batch row b; INT32_MIN (visible to every query) where the source has none.
__device__ __forceinline__ int32_t key_position(const SourceView& source, int64_t b, int64_t j) {
  return source.positions == nullptr ? INT32_MIN : source.positions[b * source.positions_stride_b + j];
}

__device__ __forceinline__ int32_t query_position(const AttentionArgs& args, int64_t b, int64_t m) {
  return args.query_positions[b * args.query_positions_stride_b + m];
}

// One key's loads, issued a tile ahead and read at the next barrier (their latency hides behind a
// tile of work): its position and whether it is kept (0: padded or past the range, else non-zero).
struct PendingKey {
  int32_t position;
  uint32_t kept;

  // Whether a query at `max_position` or below can see the key.
  __device__ __forceinline__ bool seen_below(int32_t max_position) const {
    return kept != 0 && position <= max_position;
  }
};

// The loads of key j of `source` in batch row b, or of no key (kept 0) when `exists` is false.
__device__ __forceinline__ PendingKey pending_key(const SourceView& source, int64_t b, int64_t j, bool exists) {
  PendingKey key{INT32_MAX, 0u};
  if (exists) {
    key.position = key_position(source, b, j);
    key.kept = source.mask == nullptr ? 1u : source.mask[b * source.mask_stride_b + j];
  }
  return key;
}

// The largest `value` over the block's kThreadsHere threads, through kThreadsHere int32 of shared
// `scratch`, free again when this returns.
template <int kThreadsHere>
__device__ __forceinline__ int32_t block_max(int32_t value, int32_t* scratch) {
  scratch[threadIdx.x] = value;
  __syncthreads();
  int32_t result = INT32_MIN;
  for (int i = 0; i < kThreadsHere; ++i) result = scratch[i] > result ? scratch[i] : result;
  __syncthreads();
  return result;
}

// The largest query position of batch row b over its rows [m0, m0 + rows) that see some key (`live`).
template <int kThreadsHere, typename Live>
__device__ __forceinline__ int32_t max_query_position(const AttentionArgs& args, int64_t b, int64_t m0,
                                                      int64_t rows, const Live& live, int32_t* scratch) {
  int32_t value = INT32_MIN;
  for (int64_t r = threadIdx.x; r < rows; r += kThreadsHere) {
    const int32_t position = query_position(args, b, m0 + r);
    if (live(r) && position > value) value = position;
  }
  return block_max<kThreadsHere>(value, scratch);
}

// Forward: the scores of the warp's rows g and g + 8 (of the warp's 16 query positions `rows`) for the
// tile's keys, -inf where the key is hidden (bias -inf) or positioned after the row.
__device__ __forceinline__ void mask_by_position(float (&s)[kBlockN / 8][4], const float* bias,
                                                 const int32_t* positions, const int32_t* rows) {
  const int lane = threadIdx.x % 32;
  const int32_t row[2] = {rows[lane_quad(lane)], rows[lane_quad(lane) + 8]};
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const int n = 8 * j + 2 * lane_in_quad(lane);
    const float2 hidden = *reinterpret_cast<const float2*>(bias + n);
    const uint2 key = *reinterpret_cast<const uint2*>(positions + n);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const bool kept = (i % 2 == 0 ? hidden.x : hidden.y) == 0.0f;
      const bool seen = kept && static_cast<int32_t>(i % 2 == 0 ? key.x : key.y) <= row[i / 2];
      s[j][i] = seen ? s[j][i] : -INFINITY;
    }
  }
}

// Selects the query rows of (b, h) from m0 on whose Q and dO load: rows that exist and see a key
// (lse > -inf). The others load as zeros with lse -inf and delta 0, so a NaN in a query or dO of a
// row without keys reaches no gradient.
struct LiveQueries {
  const float* lse;  // of row m0
  int64_t valid;     // rows that exist

  __device__ static LiveQueries at(const AttentionArgs& args, int64_t b, int64_t h, int64_t m0, int rows) {
    return LiveQueries{args.lse + (b * args.heads + h) * args.q_len + m0, min(int64_t{rows}, args.q_len - m0)};
  }
  __device__ bool operator()(int r) const { return r < valid && lse[r] != -INFINITY; }
};

// Backward: x[nt][i] set to 0 where invisible(nt, i), element i of accumulator tile nt being
// positioned after its query (the caller maps (nt, i) to a key and a query).
template <int NT, typename Invisible>
__device__ __forceinline__ void hide_by_position(float (&x)[NT][4], const Invisible& invisible) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) x[nt][i] = invisible(nt, i) ? 0.0f : x[nt][i];
  }
}

// Backward: starts copying the positions of query rows [m0, m0 + rows) of batch row b that `live` keeps
// (the others: INT32_MIN, their probabilities are 0 anyway) into `positions`.
template <int kThreadsHere, typename Live>
__device__ __forceinline__ void issue_query_positions(const AttentionArgs& args, int64_t b, int64_t m0, int rows,
                                                      const Live& live, int32_t* positions) {
  for (int r = threadIdx.x; r < rows; r += kThreadsHere) {
    if (live(r)) {
      __pipeline_memcpy_async(positions + r, args.query_positions + b * args.query_positions_stride_b + m0 + r,
                              sizeof(int32_t));
    } else {
      positions[r] = INT32_MIN;
    }
  }
}

// The position of concatenated key `key` in batch row b, from its own source.
__device__ __forceinline__ int32_t concat_key_position(const AttentionArgs& args, const ConcatKeys& keys, int64_t b,
                                                       int64_t key) {
  const KeyRow at = keys.locate(key);
  return key_position(args.sources[at.source], b, at.row);
}

// This thread's key threadIdx.x of key tile `tile` of the concatenated keys, from its own source (none
// past the tile's end).
__device__ __forceinline__ PendingKey tile_pending_key(const AttentionArgs& args, const ConcatKeys& keys,
                                                       const KeyTile& tile, int64_t b) {
  const int64_t key = tile.start + threadIdx.x;
  const KeyRow at = keys.locate(key);
  return pending_key(args.sources[at.source], b, at.row, key < tile.end);
}

// Backward: stores this thread's pending key (key threadIdx.x of a tile) into the tile's visibility bytes
// (its mask byte as loaded, non-zero: kept) and, under positions, its key positions, both as they are:
// nothing reads the loads before the store (a masked key is hidden by its byte whatever its position).
template <bool kPositions, int kKeys>
__device__ __forceinline__ void store_pending_key(const PendingKey& key, uint8_t* visible, int32_t* positions) {
  if (threadIdx.x < kKeys) {
    visible[threadIdx.x] = static_cast<uint8_t>(key.kept);
    if constexpr (kPositions) positions[threadIdx.x] = key.position;
  }
}

}  // namespace mplug
