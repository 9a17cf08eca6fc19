// Backward kernels: delta = rowsum(dO * O) - dlse; dK/dV of one key tile of one source over every
// query tile (dQ by float32 atomics when args.dq_accum is set); and a deterministic dQ kernel that
// walks every key tile of every source for one query tile.
#pragma once

#include "kernel_utils.cuh"

namespace mplug {

// Byte offsets of the backward kernels' shared-memory tiles; the accumulators come last.
template <typename T, int D>
struct BackwardSmem {
  static constexpr size_t kKeyTile = align128(kBlockN * HeadTile<D>::kLd * sizeof(T));
  static constexpr size_t kQueryTile = align128(kBlockM * HeadTile<D>::kLd * sizeof(T));
  static constexpr size_t kScoreTile = align128(kBlockM * kScoreLd * sizeof(float));
  static constexpr size_t kProbTile = align128(kBlockM * kProbLd * sizeof(T));
  static constexpr size_t keys = 0;
  static constexpr size_t values = keys + kKeyTile;
  static constexpr size_t queries = values + kKeyTile;
  static constexpr size_t douts = queries + kQueryTile;
  static constexpr size_t scores = douts + kQueryTile;
  static constexpr size_t dprobs = scores + kScoreTile;
  static constexpr size_t probs = dprobs + kScoreTile;
  static constexpr size_t dscores = probs + kProbTile;
  static constexpr size_t visible = dscores + kProbTile;
  static constexpr size_t row_lse = visible + align128(kBlockN);
  static constexpr size_t row_delta = row_lse + align128(kBlockM * sizeof(float));
  static constexpr size_t accumulators = row_delta + align128(kBlockM * sizeof(float));
  static constexpr size_t kKeyAcc = align128(kBlockN * HeadTile<D>::kAccLd * sizeof(float));
  static constexpr size_t dkdv_bytes = accumulators + 2 * kKeyAcc;
  static constexpr size_t dq_bytes = accumulators + align128(kBlockM * HeadTile<D>::kAccLd * sizeof(float));
  // the dK/dV kernel's per-tile dQ product reuses the (then consumed) scores and dprobs tiles
  static_assert(2 * kScoreTile >= kBlockM * HeadTile<D>::kAccLd * sizeof(float), "dQ scratch does not fit");
};

template <typename T, int D>
struct BackwardTiles {
  T* keys;
  T* values;
  T* queries;
  T* douts;
  float* scores;
  float* dprobs;
  T* probs;
  T* dscores;
  uint8_t* visible;
  float* row_lse;
  float* row_delta;
  float* accumulators;

  __device__ static BackwardTiles at(unsigned char* smem) {
    using Smem = BackwardSmem<T, D>;
    return BackwardTiles{reinterpret_cast<T*>(smem + Smem::keys),        reinterpret_cast<T*>(smem + Smem::values),
                         reinterpret_cast<T*>(smem + Smem::queries),     reinterpret_cast<T*>(smem + Smem::douts),
                         reinterpret_cast<float*>(smem + Smem::scores),  reinterpret_cast<float*>(smem + Smem::dprobs),
                         reinterpret_cast<T*>(smem + Smem::probs),       reinterpret_cast<T*>(smem + Smem::dscores),
                         smem + Smem::visible,                           reinterpret_cast<float*>(smem + Smem::row_lse),
                         reinterpret_cast<float*>(smem + Smem::row_delta),
                         reinterpret_cast<float*>(smem + Smem::accumulators)};
  }
};

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

// Starts loading Q and dO of query rows [m0, m0 + kBlockM) and stores their lse and delta; rows
// past the end get lse -inf, so their probabilities are 0.
template <typename T, int D>
__device__ __forceinline__ void load_query_tile(const AttentionArgs& args, const BackwardTiles<T, D>& tiles, int64_t b,
                                                int64_t h, int64_t m0) {
  const int64_t valid = min(int64_t{kBlockM}, args.q_len - m0);
  load_rows_async<T, D, kBlockM>(tiles.queries, element<const T>(args.q, b, m0, h), args.q.stride_s, valid);
  load_rows_async<T, D, kBlockM>(tiles.douts, element<const T>(args.dout, b, m0, h), args.dout.stride_s, valid);
  const int64_t row0 = (b * args.heads + h) * args.q_len + m0;
  for (int r = threadIdx.x; r < kBlockM; r += kThreads) {
    tiles.row_lse[r] = r < valid ? args.lse[row0 + r] : -INFINITY;
    tiles.row_delta[r] = r < valid ? args.delta[row0 + r] : 0.0f;
  }
}

// Starts loading K and V of one key tile and marks which of its keys are visible.
template <typename T, int D>
__device__ __forceinline__ void load_key_tile(const AttentionArgs& args, const BackwardTiles<T, D>& tiles,
                                              const KeyTile& tile, int64_t b, int64_t h) {
  const SourceView& source = args.sources[tile.source];
  const int64_t valid = tile.end - tile.start;
  load_rows_async<T, D, kBlockN>(tiles.keys, element<const T>(source.k, b, tile.start, h), source.k.stride_s, valid);
  load_rows_async<T, D, kBlockN>(tiles.values, element<const T>(source.v, b, tile.start, h), source.v.stride_s, valid);
  for (int n = threadIdx.x; n < kBlockN; n += kThreads) tiles.visible[n] = key_visible(source, tile, b, n);
}

// P = exp(S * scale - lse) and dS = P * (dO V^T - delta) of the loaded query and key tiles.
template <typename T, int D>
__device__ __forceinline__ void probs_and_dscores(const AttentionArgs& args, const BackwardTiles<T, D>& tiles) {
  using namespace nvcuda;
  constexpr int kLd = HeadTile<D>::kLd;
  block_gemm<T, wmma::row_major, wmma::col_major, kBlockM / kFrag, kBlockN / kFrag, D / kFrag>(
      tiles.queries, kLd, tiles.keys, kLd, tiles.scores, kScoreLd, false);
  block_gemm<T, wmma::row_major, wmma::col_major, kBlockM / kFrag, kBlockN / kFrag, D / kFrag>(
      tiles.douts, kLd, tiles.values, kLd, tiles.dprobs, kScoreLd, false);
  __syncthreads();
  const float scale_log2 = args.scale * kLog2e;
  for (int i = threadIdx.x; i < kBlockM * kBlockN; i += kThreads) {
    const int r = i / kBlockN;
    const int n = i % kBlockN;
    const float p = tiles.visible[n] ? probability_from_lse(tiles.scores[r * kScoreLd + n] * scale_log2, tiles.row_lse[r])
                                     : 0.0f;
    const float ds = p * (tiles.dprobs[r * kScoreLd + n] - tiles.row_delta[r]);
    tiles.probs[r * kProbLd + n] = from_float<T>(p);
    tiles.dscores[r * kProbLd + n] = from_float<T>(ds);
  }
  __syncthreads();
}

// Adds scale * (dS K) of the current tiles to the float32 dQ accumulator in global memory.
template <typename T, int D>
__device__ __forceinline__ void accumulate_dq_atomic(const AttentionArgs& args, const BackwardTiles<T, D>& tiles,
                                                     int64_t b, int64_t h, int64_t m0) {
  using namespace nvcuda;
  constexpr int kAccLd = HeadTile<D>::kAccLd;
  float* dq_part = tiles.scores;
  block_gemm<T, wmma::row_major, wmma::row_major, kBlockM / kFrag, D / kFrag, kBlockN / kFrag>(
      tiles.dscores, kProbLd, tiles.keys, HeadTile<D>::kLd, dq_part, kAccLd, false);
  __syncthreads();
  const int64_t valid = min(int64_t{kBlockM}, args.q_len - m0);
  for (int i = threadIdx.x; i < valid * D; i += kThreads) {
    const int r = i / D;
    const int d = i % D;
    atomicAdd(args.dq_accum + ((b * args.q_len + m0 + r) * args.heads + h) * D + d, dq_part[r * kAccLd + d] * args.scale);
  }
}

// grid (B*H, key tiles of all sources): dK, dV of one key tile, looping over every query tile.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dkdv_kernel(const AttentionArgs args) {
  using namespace nvcuda;
  using Smem = BackwardSmem<T, D>;
  constexpr int kLd = HeadTile<D>::kLd;
  constexpr int kAccLd = HeadTile<D>::kAccLd;
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardTiles<T, D> tiles = BackwardTiles<T, D>::at(smem);
  float* dk_acc = tiles.accumulators;
  float* dv_acc = reinterpret_cast<float*>(smem + Smem::accumulators + Smem::kKeyAcc);

  const int64_t b = blockIdx.x / args.heads;
  const int64_t h = blockIdx.x % args.heads;
  const TileWalk walk = TileWalk::over(args, 0, INT64_MAX);
  const KeyTile tile = walk.at(blockIdx.y);
  load_key_tile<T, D>(args, tiles, tile, b, h);
  zero_floats(dk_acc, kBlockN * kAccLd);
  zero_floats(dv_acc, kBlockN * kAccLd);
  for (int64_t m0 = 0; m0 < args.q_len; m0 += kBlockM) {
    load_query_tile<T, D>(args, tiles, b, h, m0);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    probs_and_dscores<T, D>(args, tiles);
    block_gemm<T, wmma::col_major, wmma::row_major, kBlockN / kFrag, D / kFrag, kBlockM / kFrag>(
        tiles.probs, kProbLd, tiles.douts, kLd, dv_acc, kAccLd, true);
    block_gemm<T, wmma::col_major, wmma::row_major, kBlockN / kFrag, D / kFrag, kBlockM / kFrag>(
        tiles.dscores, kProbLd, tiles.queries, kLd, dk_acc, kAccLd, true);
    if (args.dq_accum != nullptr) accumulate_dq_atomic<T, D>(args, tiles, b, h, m0);
    __syncthreads();
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  const SourceView& source = args.sources[tile.source];
  const int64_t valid = tile.end - tile.start;
  for (int i = threadIdx.x; i < valid * D; i += kThreads) {
    const int n = i / D;
    const int d = i % D;
    element<T>(source.dk, b, tile.start + n, h)[d] = from_float<T>(dk_acc[n * kAccLd + d] * args.scale);
    element<T>(source.dv, b, tile.start + n, h)[d] = from_float<T>(dv_acc[n * kAccLd + d]);
  }
}

// grid (B*H, query tiles): deterministic dQ of one query tile over every key tile of every source.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const AttentionArgs args) {
  using namespace nvcuda;
  constexpr int kAccLd = HeadTile<D>::kAccLd;
  extern __shared__ __align__(128) unsigned char smem[];
  const BackwardTiles<T, D> tiles = BackwardTiles<T, D>::at(smem);
  float* dq_acc = tiles.accumulators;

  const int64_t b = blockIdx.x / args.heads;
  const int64_t h = blockIdx.x % args.heads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const TileWalk walk = TileWalk::over(args, 0, INT64_MAX);
  load_query_tile<T, D>(args, tiles, b, h, m0);
  zero_floats(dq_acc, kBlockM * kAccLd);
  for (int64_t t = 0; t < walk.total; ++t) {
    load_key_tile<T, D>(args, tiles, walk.at(t), b, h);
    __pipeline_commit();
    __pipeline_wait_prior(0);
    __syncthreads();
    probs_and_dscores<T, D>(args, tiles);
    block_gemm<T, wmma::row_major, wmma::row_major, kBlockM / kFrag, D / kFrag, kBlockN / kFrag>(
        tiles.dscores, kProbLd, tiles.keys, HeadTile<D>::kLd, dq_acc, kAccLd, true);
    __syncthreads();
  }
  __pipeline_commit();
  __pipeline_wait_prior(0);
  __syncthreads();
  const int64_t valid = min(int64_t{kBlockM}, args.q_len - m0);
  for (int i = threadIdx.x; i < valid * D; i += kThreads) {
    const int r = i / D;
    const int d = i % D;
    element<T>(args.dq, b, m0 + r, h)[d] = from_float<T>(dq_acc[r * kAccLd + d] * args.scale);
  }
}

inline int64_t total_key_tiles(const AttentionArgs& args) {
  int64_t tiles = 0;
  for (int s = 0; s < args.num_sources; ++s) tiles += (args.sources[s].length + kBlockN - 1) / kBlockN;
  return tiles;
}

template <typename T>
void backward_for_type(const AttentionArgs& args) {
  const int64_t rows = args.batch * args.heads * args.q_len;
  if (rows > 0) {
    launch(delta_kernel<T>, "delta_kernel", dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), 0, args);
  }
  const int64_t key_tiles = total_key_tiles(args);
  const int64_t query_tiles = (args.q_len + kBlockM - 1) / kBlockM;
  const unsigned num_bh = static_cast<unsigned>(args.batch * args.heads);
  dispatch_head_dim(args.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    if (key_tiles > 0) {
      launch(dkdv_kernel<T, D>, "dkdv_kernel", dim3(num_bh, static_cast<unsigned>(key_tiles)),
             BackwardSmem<T, D>::dkdv_bytes, args);
    }
    if (args.dq_accum == nullptr && query_tiles > 0) {
      launch(dq_kernel<T, D>, "dq_kernel", dim3(num_bh, static_cast<unsigned>(query_tiles)),
             BackwardSmem<T, D>::dq_bytes, args);
    }
  });
}

}  // namespace mplug
