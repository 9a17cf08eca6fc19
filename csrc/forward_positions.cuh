// The forward with positional visibility (AttentionArgs::positional): forward_kernel's pipeline, plus
// per key tile the positions of its keys in shared memory (loaded a tile ahead, as the mask bytes)
// and per lane the positions of its two query rows in registers. A key tile that no query row of
// the CTA can see (every key padded or positioned after the CTA's last query) is neither loaded nor
// computed; a query row that sees no key ends with output 0 and lse -inf.
#pragma once

#include "forward.cuh"
#include "visibility.cuh"

namespace mplug {

// The CTA's query positions: row r's (INT32_MIN past the queries), each warp's smallest (INT32_MAX
// for a warp past the queries) and the CTA's largest; and each warp's stamp slot (warp_sees_whole_tile, 0 at first).
struct QueryPositions {
  int32_t row[kForwardMaxWarps * kForwardWarpRows];
  int32_t warp_min[kForwardMaxWarps];
  int32_t cta_max;
  int32_t hidden_stamp[kForwardMaxWarps];
};

// forward_kernel's shared memory, then three rotating key bias buffers, one float per key (0 where some
// row of the CTA can see the key, else -inf; tile t uses buffer t % 3: written one tile ahead, read by the
// copies and the compute of its tile), three rotating int32 key position buffers (as the bias buffers),
// then the QueryPositions.
template <int D>
struct PositionalSmem {
  static constexpr int kKeyBuffers = 3;
  static constexpr int bias = static_cast<int>(ForwardSmem<D>::bytes);
  static constexpr int positions = bias + kKeyBuffers * kBlockN * sizeof(float);
  static constexpr int queries = positions + kKeyBuffers * kBlockN * sizeof(int32_t);
  static constexpr size_t bytes = queries + sizeof(QueryPositions);
};

// issue_tile's test of row n of a tile: whether its bias is 0.
struct BiasVisible {
  const float* bias;
  __device__ __forceinline__ bool operator()(int row) const { return bias[row] == 0.0f; }
};

// Fills `queries` for the CTA's rows from cta_row0 on (thread r reads row r).
template <int kThreadsHere>
__device__ __forceinline__ void load_query_positions(const AttentionArgs& args, int64_t b, int64_t cta_row0,
                                                     QueryPositions* queries) {
  constexpr int kRows = kThreadsHere / 32 * kForwardWarpRows;
  const int64_t m = cta_row0 + threadIdx.x;
  if (threadIdx.x < kRows) queries->row[threadIdx.x] = m < args.q_len ? query_position(args, b, m) : INT32_MIN;
  __syncthreads();
  const int warp = static_cast<int>(threadIdx.x);
  if (warp < kThreadsHere / 32) {
    int32_t smallest = INT32_MAX;
    for (int r = warp * kForwardWarpRows; r < (warp + 1) * kForwardWarpRows && cta_row0 + r < args.q_len; ++r) {
      smallest = queries->row[r] < smallest ? queries->row[r] : smallest;
    }
    queries->warp_min[warp] = smallest;
    queries->hidden_stamp[warp] = 0;
  } else if (warp == kThreadsHere / 32) {
    int32_t largest = INT32_MIN;
    for (int r = 0; r < kRows; ++r) largest = queries->row[r] > largest ? queries->row[r] : largest;
    queries->cta_max = largest;
  }
  __syncthreads();
}

// This thread's key k0 + threadIdx.x of a tile (none past `hi` or the tile): its position and mask byte,
// loaded a tile ahead and read only at the next barrier (publish_key).
template <int kThreadsHere>
__device__ __forceinline__ PendingKey split_pending_key(const AttentionArgs& args, const ConcatKeys& keys,
                                                        int64_t b, int64_t k0, int64_t hi) {
  static_assert(kThreadsHere >= kBlockN, "one key per thread");
  const int64_t key = k0 + threadIdx.x;
  PendingKey pending{INT32_MAX, 0u};
  if (threadIdx.x < kBlockN && key < hi) {
    const int s = keys.source_of(key);
    const SourceView& source = args.sources[s];
    const int64_t j = key - keys.start(s);
    pending = PendingKey{INT32_MIN, 1u};
    if (source.positions != nullptr) pending.position = source.positions[b * source.positions_stride_b + j];
    if (source.mask != nullptr) pending.kept = source.mask[b * source.mask_stride_b + j];
  }
  return pending;
}

// Writes this thread's key into its tile's bias (0 where some row of the CTA can see it, else -inf) and
// position buffers; returns whether some row can see it.
__device__ __forceinline__ bool publish_key(const PendingKey& key, int32_t cta_max, float* bias, int32_t* positions) {
  const bool seen = key.seen_below(cta_max);
  if (threadIdx.x < kBlockN) {
    bias[threadIdx.x] = seen ? 0.0f : -INFINITY;
    positions[threadIdx.x] = key.position;
  }
  return seen;
}

// Whether every row of the warp (smallest position `warp_min`) sees every key of the tile: then its scores
// need no masking. Without a warp vote (whose divergence fallback ptxas calls inside the loop on sm_80): a lane
// with a key some row of the warp cannot see writes the tile's `stamp` (> 0, new each tile) into the warp's
// slot; after __syncwarp the slot holds the stamp iff some lane did. The slot is rewritten only after the
// next tile's barrier, when every lane has read it.
__device__ __forceinline__ bool warp_sees_whole_tile(const float* bias, const int32_t* positions, int32_t warp_min,
                                                     int32_t stamp, int32_t* slot) {
  const int n = 2 * (threadIdx.x % 32);
  const float2 hidden = *reinterpret_cast<const float2*>(bias + n);
  const uint2 key = *reinterpret_cast<const uint2*>(positions + n);
  const bool seen = hidden.x == 0.0f && hidden.y == 0.0f && static_cast<int32_t>(key.x) <= warp_min &&
                    static_cast<int32_t>(key.y) <= warp_min;
  if (!seen) *slot = stamp;
  __syncwarp();
  return *slot != stamp;
}

// forward_kernel (same grid, pipeline and outputs) under positional visibility; a tile every row of a warp
// sees needs no masking, the others mask by position. Registers capped at 255 rather than
// __launch_bounds__'s choice (168 at D = 64 spilled).
template <typename T, int D, int kWarps>
__global__ void __maxnreg__(255) positional_forward_kernel(const __grid_constant__ AttentionArgs args) {
  constexpr int kThreadsHere = kWarps * 32;
  using Smem = ForwardSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t query_tiles = (args.q_len + kWarps * kForwardWarpRows - 1) / (kWarps * kForwardWarpRows);
  const int64_t bh = blockIdx.x / query_tiles;
  const int64_t b = bh / args.heads;
  const int64_t h = bh % args.heads;
  const int64_t kv_h = h / args.kv_group();
  const int warp_index = threadIdx.x / 32;
  const int64_t cta_row0 = (blockIdx.x % query_tiles) * (kWarps * kForwardWarpRows);
  const int64_t row0 = cta_row0 + warp_index * kForwardWarpRows;
  const ConcatKeys keys = ConcatKeys::of(args);
  const int64_t total = keys.total;
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * args.split_size;
  const int64_t hi = blockIdx.y + 1 == args.num_splits ? total : min(lo + args.split_size, total);
  const int tiles = hi > lo ? static_cast<int>((hi - lo + kBlockN - 1) / kBlockN) : 0;
  const float scale_log2 = fmaxf(fabsf(args.scale) * kLog2e, FLT_MIN);
  auto stage_of = [&](int t) { return smem + (t % kForwardStages) * Smem::kStageBytes; };
  auto flags_at = [&](int buffer) {
    return reinterpret_cast<float*>(smem + PositionalSmem<D>::bias) + buffer * kBlockN;
  };
  auto positions_at = [&](int buffer) {
    return reinterpret_cast<int32_t*>(smem + PositionalSmem<D>::positions) + buffer * kBlockN;
  };
  auto following = [](int buffer) { return buffer + 1 == PositionalSmem<D>::kKeyBuffers ? 0 : buffer + 1; };

  QueryPositions* queries = reinterpret_cast<QueryPositions*>(smem + PositionalSmem<D>::queries);
  load_query_positions<kThreadsHere>(args, b, cta_row0, queries);
  RegisterQueries<D> q;
  load_queries<T, D>(args, b, h, row0, args.scale < 0.0f ? 0x80008000u : 0u, q);
  WarpState<D> warp;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) warp.o[n][i] = 0.0f;
  }
  warp.rows[0] = warp.rows[1] = empty_softmax();

  // tile t's bias and position buffer and count of keys some row sees (buffer, seen), tile t + 1's (next_buffer,
  // next_seen, published) and the loads of this thread's key of tile t + 2 (pending)
  int buffer = 0;
  int seen = 0;
  int next_buffer = 0;
  int next_seen = __syncthreads_count(publish_key(split_pending_key<kThreadsHere>(args, keys, b, lo, hi),
                                                  queries->cta_max, flags_at(0), positions_at(0)));
  PendingKey pending = split_pending_key<kThreadsHere>(args, keys, b, lo + kBlockN, hi);
  auto visibility = [&]() {
    return TileVisibility<BiasVisible>{next_seen != 0, next_seen == kBlockN, BiasVisible{flags_at(next_buffer)}};
  };
  auto next_tile = [&](int t) {
    buffer = next_buffer;
    seen = next_seen;
    next_buffer = following(buffer);
    __pipeline_wait_prior(0);
    next_seen = __syncthreads_count(publish_key(pending, queries->cta_max, flags_at(next_buffer),
                                                positions_at(next_buffer)));
    pending = split_pending_key<kThreadsHere>(args, keys, b, lo + int64_t{t + 2} * kBlockN, hi);
    return visibility();
  };
  auto compute = [&](int t) {
    if (seen == 0 || row0 >= args.q_len) return;  // no row sees the tile; a warp past the queries only loads
    const float* bias = flags_at(buffer);
    const int32_t* positions = positions_at(buffer);
    float s[kBlockN / 8][4];
    tile_scores<T, D>(q, stage_of(t) + Smem::keys, s);
    if (!warp_sees_whole_tile(bias, positions, queries->warp_min[warp_index], t + 1,
                              queries->hidden_stamp + warp_index)) {
      mask_by_position(s, bias, positions, queries->row + warp_index * kForwardWarpRows);
    }
    online_softmax<D>(s, scale_log2, warp);
    accumulate_values<T, D>(s, stage_of(t) + Smem::values, warp.o);
  };
  key_loop<T, D, kThreadsHere>(args, b, kv_h, lo, tiles, visibility(), stage_of, next_tile, compute);
  __syncthreads();
  if (row0 < args.q_len) write_rows<T, D>(args, b, h, row0, warp, smem + warp_index * kForwardWarpRows * D * 2);
}

// positional_forward_kernel by element type, head dim and warps, its name and its shared memory bytes.
struct PositionalForward {
  static constexpr const char* kName = "positional_forward_kernel";
  static constexpr bool kTallRows = false;  // 16-row warps only
  template <typename T, int D, int kWarps>
  static constexpr auto kernel() { return positional_forward_kernel<T, D, kWarps>; }
  template <int D>
  static constexpr size_t smem_bytes() { return PositionalSmem<D>::bytes; }
};

// The forward of `args`: positional_forward_kernel when it carries positions, else the key tile words (with masks)
// and forward_kernel; then the combine.
template <typename T>
void forward_any(const AttentionArgs& args) {
  if (args.positional()) return forward_for_type<T, PositionalForward>(args);
  launch_key_tile_words(args);
  forward_for_type<T>(args);
}

}  // namespace mplug
