// Backward kernels, register-resident (mma.sync m16n8k16, float32 accumulation):
// - delta = rowsum(dO * O) - dlse;
// - dK/dV: one CTA per 64-key tile of the concatenated keys (rows possibly of several sources: key_tiles.h,
//   backward_keys.cuh), each warp owning 16 of its keys with their dK and dV in registers, over every
//   query tile (Q and dO double-buffered through cp.async, lse and delta a step ahead: dkdv_queries.cuh);
//   S^T, P^T, dP^T and dS^T stay in registers, P^T and dS^T re-used as A operands; dQ by float32
//   atomics when args.dq_accum is set, from dS^T staged in shared memory;
// - dQ, deterministic (no atomics): one CTA per 64 query rows, each warp owning 16 rows, over every
//   key tile of the concatenated keys (K and V double-buffered, the keys' visibility loaded a tile ahead).
// Masked keys, and query rows that see no key, are selected out, never multiplied: their K/V (Q/dO)
// rows load as zeros and their P and dS are 0, so a NaN there reaches no gradient. Under positional
// visibility (the kPositions kernels, csrc/visibility.cuh) P and dS are also 0 where a key is positioned
// after its query, and key tiles no query row can see are neither loaded nor computed.
#pragma once

#include "backward_keys.cuh"
#include "dkdv_queries.cuh"

namespace mplug {
// The backward's own names: kernels of other translation units may define helpers of the same name.
namespace backward {

constexpr int kDqQueries = kWarps * kMmaM;        // query rows per deterministic dQ CTA, 16 per warp
constexpr int kKeyTiles = kBackwardKeys / kMmaN;  // 8-column accumulator tiles of S

// Byte offsets of the deterministic dQ kernel's shared memory: swizzled Q and dO tiles, two stages
// of K and V, and three rotating buffers of their keys' visibility (and positions): tile t's in buffer
// t % 3, stored a step ahead before the barrier its copies wait for. After the loop the Q tile holds
// the finished dQ.
template <int D>
struct DqSmem {
  static constexpr size_t kQueryTile = kDqQueries * D * 2;
  static constexpr size_t kKeyTile = kBackwardKeys * D * 2;
  static constexpr size_t queries = 0;
  static constexpr size_t douts = queries + kQueryTile;
  static constexpr size_t keys = douts + kQueryTile;  // stage s at keys + s * kKeyTile
  static constexpr size_t values = keys + 2 * kKeyTile;
  static constexpr int kKeyBuffers = 3;
  static constexpr size_t visible = values + 2 * kKeyTile;  // buffer i at visible + i * kBackwardKeys
  static constexpr size_t bytes = visible + kKeyBuffers * kBackwardKeys;
  static constexpr size_t key_positions = bytes;  // int32, as visible: the kPositions kernel only
  static constexpr size_t positional_bytes = key_positions + kKeyBuffers * kBackwardKeys * sizeof(int32_t);
};

// Starts 16-byte asynchronous copies of the rows r of a [ROWS, D] slab for which keep(r) holds
// into a swizzled tile, and zero-fills the other rows (selected out: what they hold reaches no MMA).
template <typename T, int D, int ROWS, typename Keep>
__device__ __forceinline__ void load_swizzled_async(unsigned char* tile, const T* rows, int64_t row_stride, Keep keep) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int col = (i % kChunks) * 8;
    unsigned char* destination = tile + swizzled_offset<D>(row, col);
    if (keep(row)) {
      __pipeline_memcpy_async(destination, rows + row * row_stride + col, 16);
    } else {
      *reinterpret_cast<uint4*>(destination) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Copies rows [0, valid) of a swizzled [ROWS, D] tile of T to global rows with 16-byte stores.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void store_swizzled(T* rows, int64_t row_stride, const unsigned char* tile, int64_t valid) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x; i < ROWS * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int col = (i % kChunks) * 8;
    if (row < valid) {
      *reinterpret_cast<uint4*>(rows + row * row_stride + col) =
          *reinterpret_cast<const uint4*>(tile + swizzled_offset<D>(row, col));
    }
  }
}

// Starts loading K and V of key tile `t` into stage `stage` of the dQ kernel, its keys' visibility
// already in key buffer `buffer`.
template <typename T, int D>
__device__ __forceinline__ void issue_dq_key_tile(const AttentionArgs& args, const ConcatKeys& keys, int64_t t,
                                                  unsigned char* smem, int stage, int buffer, int64_t b, int64_t h) {
  using Smem = DqSmem<D>;
  const uint8_t* visible = smem + Smem::visible + buffer * kBackwardKeys;
  issue_key_tile<T, D>(args, keys, keys.tile(t), b, h, smem + Smem::keys + stage * Smem::kKeyTile,
                       smem + Smem::values + stage * Smem::kKeyTile, [&](int n) { return visible[n] != 0; });
}

// Step t of the dQ kernel's two-stage K/V pipeline (t = -1: its start): waits until tile t has landed,
// stores the keys of tile t + 1 (`next_keys`, loaded a step ahead) into key buffer `next_buffer`, then at
// the barrier (every warp done with step t - 1, the stores visible) finds whether some thread's key of
// tile t + 1 is seen (always, without positions) and if so starts loading it by issue(t + 1, stage,
// next_buffer) into the stage step t does not read. Returns whether tile t + 1 is seen.
template <int D, bool kPositions, typename Issue>
__device__ __forceinline__ bool dq_pipeline_step(int64_t t, int64_t count, const PendingKey& next_keys, int32_t q_max,
                                                 unsigned char* smem, int next_buffer, const Issue& issue) {
  using Smem = DqSmem<D>;
  __pipeline_wait_prior(0);
  store_pending_key<kPositions, kBackwardKeys>(
      next_keys, smem + Smem::visible + next_buffer * kBackwardKeys,
      reinterpret_cast<int32_t*>(smem + Smem::key_positions) + next_buffer * kBackwardKeys);
  bool next_seen = true;
  if constexpr (kPositions) {
    next_seen = !__syncthreads_and(!next_keys.seen_below(q_max));
  } else {
    __syncthreads();
  }
  if (t + 1 < count && next_seen) issue(t + 1, static_cast<int>((t + 1) % 2), next_buffer);
  __pipeline_commit();
  return next_seen;
}

// Step t of a two-stage cp.async pipeline over `count` tiles: waits until tile t (in stage t % 2)
// has landed and is visible to every warp, every warp being done with step t - 1 (its stage and
// what else it read, such as the dK/dV kernel's staged dS^T), then starts loading tile t + 1 into
// the other stage by issue(t + 1, stage). Returns tile t's stage.
template <typename Issue>
__device__ __forceinline__ int pipeline_step(int64_t t, int64_t count, const Issue& issue) {
  const int stage = static_cast<int>(t % 2);
  __pipeline_wait_prior(0);
  __syncthreads();
  if (t + 1 < count) issue(t + 1, 1 - stage);
  __pipeline_commit();
  return stage;
}

}  // namespace backward

// One warp per query row: delta[b, h, m] = sum_d dO * O - dlse[b, h, m].
template <typename T>
__global__ void __launch_bounds__(kThreads) delta_kernel(const AttentionArgs args) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= args.batch * args.heads * args.q_len) return;
  const int64_t bh = row / args.q_len;
  const int64_t m = row % args.q_len;
  const T* out = element<const T>(args.out, bh / args.heads, m, bh % args.heads);
  const T* dout = element<const T>(args.dout, bh / args.heads, m, bh % args.heads);
  float sum = 0.0f;
  for (int64_t d = lane; d < args.head_dim; d += 32) sum += to_float(out[d]) * to_float(dout[d]);
  sum = warp_sum(sum);
  if (lane == 0) args.delta[row] = sum - (args.dlse != nullptr ? args.dlse[row] : 0.0f);
}

// grid (key tiles of the concatenated keys x B*Hkv, key tiles of one K/V head adjacent): dK, dV of one key tile
// over every query tile of each query head of the K/V head's group in turn (summed here, no atomics
// between heads), and dQ by atomics when args.dq_accum is set.
template <typename T, int D, bool kPositions>
__global__ void __launch_bounds__(kThreads, 2) dkdv_kernel(const AttentionArgs args) {
  using namespace backward;
  using Smem = DkdvSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const ConcatKeys keys = ConcatKeys::of(args);
  const int64_t group = args.kv_group();
  const int64_t bkv = blockIdx.x / keys.tile_count();
  const int64_t b = bkv / args.kv_head_count();
  const int64_t kv_h = bkv % args.kv_head_count();
  const KeyTile tile = keys.tile(blockIdx.x % keys.tile_count());
  const int key0 = warp * kMmaM;
  const auto visible_key = [&](int n) { return key_visible(args, keys, tile, b, n); };
  const bool visible[2] = {visible_key(key0 + acc_row(lane, 0)), visible_key(key0 + acc_row(lane, 2))};
  int32_t key_positions[2] = {INT32_MIN, INT32_MIN};
  bool seen = true;  // under positions: a tile whose keys no query sees is neither loaded nor computed
  if constexpr (kPositions) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t key = tile.start + key0 + acc_row(lane, 2 * k);
      key_positions[k] = visible[k] ? concat_key_position(args, keys, b, key) : INT32_MAX;
    }
    const int32_t q_max = max_query_position<kThreads>(args, b, 0, args.q_len, [](int64_t) { return true; },
                                                       reinterpret_cast<int32_t*>(smem + Smem::dscores));
    seen = !__syncthreads_and(!tile_pending_key(args, keys, tile, b).seen_below(q_max));
  }
  const int64_t query_tiles = (args.q_len + kBackwardQueries - 1) / kBackwardQueries;
  // step t: query tile t % query_tiles of the group's query head kv_h * group + t / query_tiles
  const int64_t steps = group * query_tiles;
  const QueryStep first{kv_h * group, 0};
  if (seen) {
    issue_key_tile<T, D>(args, keys, tile, b, kv_h, smem + Smem::keys, smem + Smem::values, visible_key);
    issue_query_rows<D, kPositions>(args, smem, row_slot(0), b, first);
    if (steps > 1) issue_query_rows<D, kPositions>(args, smem, row_slot(1), b, first.next(args.q_len));
    issue_query_tile<T, D>(args, smem, 0, b, first, LiveQueries::at(args, b, first.h, 0, kBackwardQueries));
  }
  __pipeline_commit();
  float dk[D / kMmaN][4];
  float dv[D / kMmaN][4];
  zero_accumulators(dk);
  zero_accumulators(dv);
  QueryStep now = first;  // step t's query tile
  // step `next` = t + 1's Q and dO, which rows load read from its row slot (landed a step ago); step t + 2's rows
  const auto issue_queries = [&](int64_t next, int stage) {
    const QueryStep ahead = now.next(args.q_len);
    const float* lse = reinterpret_cast<const float*>(smem + Smem::lse + row_slot(next) * Smem::kRows);
    issue_query_tile<T, D>(args, smem, stage, b, ahead, [&](int r) { return lse[r] != -INFINITY; });
    if (next + 1 < steps) issue_query_rows<D, kPositions>(args, smem, row_slot(next + 1), b, ahead.next(args.q_len));
  };
  for (int64_t t = 0; seen && t < steps; ++t) {
    const int stage = pipeline_step(t, steps, issue_queries);
    uint32_t ds_frags[kQueryTiles / 2][4];
    dkdv_stage<T, D, kPositions>(args, smem, stage, row_slot(t), key0, visible, key_positions, dk, dv, ds_frags);
    if (args.dq_accum != nullptr) {
      stage_dscores(smem + Smem::dscores, key0, ds_frags);
      __syncthreads();
      accumulate_dq_atomic<T, D>(args, smem + Smem::dscores, smem + Smem::keys, b, now);
    }
    now = now.next(args.q_len);
  }
  __pipeline_wait_prior(0);
  // every warp is done reading K and V before they are overwritten by dK and dV
  __syncthreads();
  stage_accumulator<T, D, D / kMmaN>(smem + Smem::keys, key0, 0, dk, args.scale);
  stage_accumulator<T, D, D / kMmaN>(smem + Smem::values, key0, 0, dv, 1.0f);
  __syncthreads();
  store_key_gradients<T, D>(args, tile, b, kv_h, smem + Smem::keys, smem + Smem::values);
}

// grid (query tiles of 64 rows x B*H, query tiles of one head adjacent): deterministic dQ of one
// query tile over every key tile of the concatenated keys; warp w owns query rows 16 w..
template <typename T, int D, bool kPositions>
__global__ void __launch_bounds__(kThreads, 2) dq_kernel(const AttentionArgs args) {
  using namespace backward;
  using Smem = DqSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t query_tiles = (args.q_len + kDqQueries - 1) / kDqQueries;
  const int64_t bh = blockIdx.x / query_tiles;
  const int64_t b = bh / args.heads;
  const int64_t h = bh % args.heads;
  const int64_t kv_h = h / args.kv_group();
  const int64_t m0 = static_cast<int64_t>(blockIdx.x % query_tiles) * kDqQueries;
  const int row0 = warp * kMmaM;
  const ConcatKeys keys = ConcatKeys::of(args);
  const int64_t key_tiles = keys.tile_count();

  const LiveQueries live = LiveQueries::at(args, b, h, m0, kDqQueries);
  // under positions: a key tile whose keys are all padded, or after every live row, is neither loaded nor computed
  int32_t q_max = INT32_MAX;
  if constexpr (kPositions) {
    q_max = max_query_position<kThreads>(args, b, m0, live.valid, live, reinterpret_cast<int32_t*>(smem + Smem::keys));
  }
  // this thread's key of tile t (none past the last tile), loaded a step before its buffer is stored
  const auto pending_of = [&](int64_t t) { return tile_pending_key(args, keys, keys.tile(t), b); };
  const auto issue_keys = [&](int64_t next, int stage, int buffer) {
    issue_dq_key_tile<T, D>(args, keys, next, smem, stage, buffer, b, kv_h);
  };
  load_swizzled_async<T, D, kDqQueries>(smem + Smem::queries, element<const T>(args.q, b, m0, h), args.q.stride_s,
                                        live);
  load_swizzled_async<T, D, kDqQueries>(smem + Smem::douts, element<const T>(args.dout, b, m0, h),
                                        args.dout.stride_s, live);
  bool seen = dq_pipeline_step<D, kPositions>(-1, key_tiles, pending_of(0), q_max, smem, 0, issue_keys);
  // lse and delta of the lane's rows g and g + 8; rows past the end or without keys get lse -inf
  float lse[2];
  float delta[2];
  int32_t row_positions[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + acc_row(lane, 2 * half);
    lse[half] = live(r) ? live.lse[r] : -INFINITY;
    delta[half] = live(r) ? args.delta[(live.lse - args.lse) + r] : 0.0f;
    row_positions[half] = kPositions && live(r) ? query_position(args, b, m0 + r) : INT32_MIN;
  }
  float dq[D / kMmaN][4];
  zero_accumulators(dq);
  const float scale_log2 = args.scale * kLog2e;
  PendingKey pending = pending_of(1);
  int buffer = 0;  // key buffer of tile t: t % 3
  for (int64_t t = 0; t < key_tiles; ++t) {
    const bool tile_seen = seen;
    const int stage = static_cast<int>(t % 2);
    const int next_buffer = buffer + 1 == Smem::kKeyBuffers ? 0 : buffer + 1;
    seen = dq_pipeline_step<D, kPositions>(t, key_tiles, pending, q_max, smem, next_buffer, issue_keys);
    pending = pending_of(t + 2);
    const int tile_buffer = buffer;
    buffer = next_buffer;
    if (!tile_seen) continue;
    const unsigned char* k_tile = smem + Smem::keys + stage * Smem::kKeyTile;
    const uint8_t* visible = smem + Smem::visible + tile_buffer * kBackwardKeys;
    float scores[kKeyTiles][4];
    float dprobs[kKeyTiles][4];
    warp_rows_product<T, D, kKeyTiles>(scores, smem + Smem::queries, row0, k_tile);
    warp_rows_product<T, D, kKeyTiles>(dprobs, smem + Smem::douts, row0, smem + Smem::values + stage * Smem::kKeyTile);
#pragma unroll
    for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const bool keep = visible[nt * kMmaN + acc_col(lane, i)] != 0;
        const float p = keep ? probability_from_lse(scores[nt][i] * scale_log2, lse[i / 2]) : 0.0f;
        dprobs[nt][i] = keep ? p * (dprobs[nt][i] - delta[i / 2]) : 0.0f;
      }
    }
    if constexpr (kPositions) {
      const int32_t* positions = reinterpret_cast<const int32_t*>(smem + Smem::key_positions) + tile_buffer * kBackwardKeys;
      hide_by_position(dprobs, [&](int nt, int i) { return positions[nt * kMmaN + acc_col(lane, i)] > row_positions[i / 2]; });
    }
    uint32_t ds_frags[kKeyTiles / 2][4];
    to_a_fragments<T, kKeyTiles>(ds_frags, dprobs);
    warp_accumulate<T, D, D / kMmaN, kKeyTiles / 2>(dq, ds_frags, k_tile, 0, 0);
  }
  __pipeline_wait_prior(0);
  // each warp overwrites only its own Q rows, which no other warp reads
  stage_accumulator<T, D, D / kMmaN>(smem + Smem::queries, row0, 0, dq, args.scale);
  __syncthreads();
  store_swizzled<T, D, kDqQueries>(element<T>(args.dq, b, m0, h), args.dq.stride_s, smem + Smem::queries, live.valid);
}

inline int64_t total_key_tiles(const AttentionArgs& args) { return ConcatKeys::of(args).tile_count(); }

template <typename T>
void backward_for_type(const AttentionArgs& args) {
  using namespace backward;
  const int64_t rows = args.batch * args.heads * args.q_len;
  if (rows > 0) {
    launch(delta_kernel<T>, "delta_kernel", dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), 0, args);
  }
  const int64_t num_bh = args.batch * args.heads;
  const int64_t num_bkv = args.batch * args.kv_head_count();  // dK/dV CTAs: one per K/V head, summing its group
  const int64_t key_tiles = total_key_tiles(args);
  const int64_t query_tiles = (args.q_len + kDqQueries - 1) / kDqQueries;
  // the positional kernels (args.positional()) are separate instantiations: the others stay as they were
  const auto kernels = [&](auto head_dim, auto positional) {
    constexpr int D = decltype(head_dim)::value;
    constexpr bool kPositions = decltype(positional)::value;
    if (key_tiles > 0) {
      launch(dkdv_kernel<T, D, kPositions>, "dkdv_kernel", dim3(static_cast<unsigned>(key_tiles * num_bkv)),
             kPositions ? DkdvSmem<D>::positional_bytes : DkdvSmem<D>::bytes, args);
    }
    if (args.dq_accum == nullptr && query_tiles > 0) {
      launch(dq_kernel<T, D, kPositions>, "dq_kernel", dim3(static_cast<unsigned>(query_tiles * num_bh)),
             kPositions ? DqSmem<D>::positional_bytes : DqSmem<D>::bytes, args);
    }
  };
  dispatch_head_dim(args.head_dim, [&](auto head_dim) {
    if (args.positional()) return kernels(head_dim, std::true_type{});
    kernels(head_dim, std::false_type{});
  });
}

}  // namespace mplug
