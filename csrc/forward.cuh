// Forward kernels: split-KV attention of up to kBlockM query rows over one key range of the
// concatenated sources (double-buffered 16-byte asynchronous K/V tile loads, tensor-core GEMMs,
// float32 running softmax), and the combine kernel that merges the splits by their lse.
#pragma once

#include "kernel_utils.cuh"

namespace mplug {

// Byte offsets of the forward kernel's shared-memory tiles.
template <typename T, int D>
struct ForwardSmem {
  static constexpr size_t kKeyTile = align128(kBlockN * HeadTile<D>::kLd * sizeof(T));
  static constexpr size_t queries = 0;
  static constexpr size_t keys = queries + align128(kBlockM * HeadTile<D>::kLd * sizeof(T));
  static constexpr size_t values = keys + 2 * kKeyTile;
  static constexpr size_t scores = values + 2 * kKeyTile;
  static constexpr size_t probs = scores + align128(kBlockM * kScoreLd * sizeof(float));
  static constexpr size_t out = probs + align128(kBlockM * kProbLd * sizeof(T));
  static constexpr size_t bytes = out + align128(kBlockM * HeadTile<D>::kAccLd * sizeof(float));
};

template <typename T, int D>
__device__ __forceinline__ void issue_key_tile(const AttentionArgs& args, const KeyTile& tile, int64_t b, int64_t h,
                                               unsigned char* key_buffer, unsigned char* value_buffer) {
  T* keys = reinterpret_cast<T*>(key_buffer);
  T* values = reinterpret_cast<T*>(value_buffer);
  const SourceView& source = args.sources[tile.source];
  const int64_t valid = tile.end - tile.start;
  load_rows_async<T, D, kBlockN>(keys, element<const T>(source.k, b, tile.start, h), source.k.stride_s, valid);
  load_rows_async<T, D, kBlockN>(values, element<const T>(source.v, b, tile.start, h), source.v.stride_s, valid);
}

// Each warp folds the scores of its kRowsPerWarp rows into their running softmax, writes the
// probabilities for the P V product and rescales the rows' output accumulators. Rows from
// `valid_rows` on (past the end of the queries) are skipped, warp-uniformly: their outputs are
// never written, and a row of the P V product depends on its own row of P only.
template <typename T, int D>
__device__ __forceinline__ void softmax_tile(const AttentionArgs& args, const KeyTile& tile, int64_t b,
                                             int valid_rows, const float* scores, T* probs, float* out_acc,
                                             RunningSoftmax (&rows)[kRowsPerWarp]) {
  static_assert(kBlockN == 64, "each lane handles keys lane and lane + 32");
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const SourceView& source = args.sources[tile.source];
  const bool visible_lo = key_visible(source, tile, b, lane);
  const bool visible_hi = key_visible(source, tile, b, lane + 32);
  const float scale_log2 = args.scale * kLog2e;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    if (r >= valid_rows) break;
    const float s_lo = visible_lo ? scores[r * kScoreLd + lane] * scale_log2 : -INFINITY;
    const float s_hi = visible_hi ? scores[r * kScoreLd + lane + 32] * scale_log2 : -INFINITY;
    float shift;
    const float alpha = rescale_for_tile(rows[i], warp_max(fmaxf(s_lo, s_hi)), &shift);
    const float p_lo = exp2f(s_lo - shift);
    const float p_hi = exp2f(s_hi - shift);
    rows[i].sum += warp_sum(p_lo + p_hi);
    probs[r * kProbLd + lane] = from_float<T>(p_lo);
    probs[r * kProbLd + lane + 32] = from_float<T>(p_hi);
    for (int d = lane; d < D; d += 32) out_acc[r * HeadTile<D>::kAccLd + d] *= alpha;
  }
}

// Writes each row's normalised output and lse: to out/lse, or to the split's partial buffers.
template <typename T, int D>
__device__ __forceinline__ void write_rows(const AttentionArgs& args, int64_t b, int64_t h, int64_t m0,
                                           const float* out_acc, const RunningSoftmax (&rows)[kRowsPerWarp]) {
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t bh = b * args.heads + h;
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) {
    const int r = warp * kRowsPerWarp + i;
    const int64_t m = m0 + r;
    if (m >= args.q_len) continue;
    const float normalizer = row_normalizer(rows[i]);
    const float* acc = out_acc + r * HeadTile<D>::kAccLd;
    if (args.num_splits == 1) {
      T* out = element<T>(args.out, b, m, h);
      for (int d = lane; d < D; d += 32) out[d] = from_float<T>(acc[d] * normalizer);
      if (lane == 0) args.lse[bh * args.q_len + m] = row_lse(rows[i]);
    } else {
      const int64_t part_row = (blockIdx.z * args.batch * args.heads + bh) * args.q_len + m;
      float* part = args.part_out + part_row * D;
      for (int d = lane; d < D; d += 32) part[d] = acc[d] * normalizer;
      if (lane == 0) args.part_lse[part_row] = row_lse(rows[i]);
    }
  }
}

// grid (B*H, query tiles, splits): query rows [m0, m0 + kBlockM) of one (batch, head) over the
// keys [split * split_size, (split + 1) * split_size) of the concatenated sources.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(const AttentionArgs args) {
  using Smem = ForwardSmem<T, D>;
  using namespace nvcuda;
  constexpr int kLd = HeadTile<D>::kLd;
  constexpr int kAccLd = HeadTile<D>::kAccLd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* queries = reinterpret_cast<T*>(smem + Smem::queries);
  // double buffers: buffer i of keys/values starts i * kKeyTile bytes in
  unsigned char* keys = smem + Smem::keys;
  unsigned char* values = smem + Smem::values;
  float* scores = reinterpret_cast<float*>(smem + Smem::scores);
  T* probs = reinterpret_cast<T*>(smem + Smem::probs);
  float* out_acc = reinterpret_cast<float*>(smem + Smem::out);

  const int64_t bh = blockIdx.x;
  const int64_t b = bh / args.heads;
  const int64_t h = bh % args.heads;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBlockM;
  const int64_t split_lo = static_cast<int64_t>(blockIdx.z) * args.split_size;
  const TileWalk walk = TileWalk::over(args, split_lo, split_lo + args.split_size);

  const int valid_rows = static_cast<int>(min(int64_t{kBlockM}, args.q_len - m0));
  load_rows_async<T, D, kBlockM>(queries, element<const T>(args.q, b, m0, h), args.q.stride_s, valid_rows);
  zero_floats(out_acc, kBlockM * kAccLd);
  if (walk.total > 0) issue_key_tile<T, D>(args, walk.at(0), b, h, keys, values);
  __pipeline_commit();

  RunningSoftmax rows[kRowsPerWarp];
#pragma unroll
  for (int i = 0; i < kRowsPerWarp; ++i) rows[i] = empty_softmax();

  for (int64_t t = 0; t < walk.total; ++t) {
    const size_t current = (t & 1) * Smem::kKeyTile;
    const size_t next = Smem::kKeyTile - current;
    if (t + 1 < walk.total) issue_key_tile<T, D>(args, walk.at(t + 1), b, h, keys + next, values + next);
    __pipeline_commit();
    __pipeline_wait_prior(1);
    __syncthreads();
    block_gemm<T, wmma::row_major, wmma::col_major, kBlockM / kFrag, kBlockN / kFrag, D / kFrag>(
        queries, kLd, reinterpret_cast<const T*>(keys + current), kLd, scores, kScoreLd, false);
    __syncthreads();
    softmax_tile<T, D>(args, walk.at(t), b, valid_rows, scores, probs, out_acc, rows);
    __syncthreads();
    block_gemm<T, wmma::row_major, wmma::row_major, kBlockM / kFrag, D / kFrag, kBlockN / kFrag>(
        probs, kProbLd, reinterpret_cast<const T*>(values + current), kLd, out_acc, kAccLd, true);
    __syncthreads();
  }
  __pipeline_wait_prior(0);
  __syncthreads();
  write_rows<T, D>(args, b, h, m0, out_acc, rows);
}

// One warp per query row: merges the row's split partial outputs weighted by exp(lse_split - lse_max).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const AttentionArgs args) {
  static_assert(kMaxSplits == 64, "each lane handles splits lane and lane + 32");
  const int lane = threadIdx.x % 32;
  const int64_t num_bh = args.batch * args.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= num_bh * args.q_len) return;
  const int64_t bh = row / args.q_len;
  const int64_t m = row % args.q_len;
  const int splits = args.num_splits;
  const float lse_lo = lane < splits ? args.part_lse[lane * num_bh * args.q_len + row] : -INFINITY;
  const float lse_hi = lane + 32 < splits ? args.part_lse[(lane + 32) * num_bh * args.q_len + row] : -INFINITY;
  const float lse_max = warp_max(fmaxf(lse_lo, lse_hi));
  const float w_lo = lane < splits ? merge_weight(lse_lo, lse_max) : 0.0f;
  const float w_hi = lane + 32 < splits ? merge_weight(lse_hi, lse_max) : 0.0f;
  const float weight_sum = warp_sum(w_lo + w_hi);
  const float normalizer = weight_sum > 0.0f ? 1.0f / weight_sum : 0.0f;
  T* out = element<T>(args.out, bh / args.heads, m, bh % args.heads);
  for (int64_t d0 = 0; d0 < args.head_dim; d0 += 32) {
    const int64_t d = d0 + lane;
    float acc = 0.0f;
    for (int s = 0; s < splits; ++s) {
      // every lane takes part in the shuffle, also lanes past head_dim
      const float weight = __shfl_sync(0xffffffffu, s < 32 ? w_lo : w_hi, s % 32);
      if (d < args.head_dim) acc += weight * args.part_out[(s * num_bh * args.q_len + row) * args.head_dim + d];
    }
    if (d < args.head_dim) out[d] = from_float<T>(acc * normalizer);
  }
  if (lane == 0) args.lse[row] = merged_lse(lse_max, weight_sum);
}

template <typename T>
void forward_for_type(const AttentionArgs& args) {
  const int64_t query_tiles = (args.q_len + kBlockM - 1) / kBlockM;
  dispatch_head_dim(args.head_dim, [&](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    const dim3 grid(static_cast<unsigned>(args.batch * args.heads), static_cast<unsigned>(query_tiles),
                    static_cast<unsigned>(args.num_splits));
    launch(forward_kernel<T, D>, "forward_kernel", grid, ForwardSmem<T, D>::bytes, args);
  });
  if (args.num_splits > 1) {
    const int64_t rows = args.batch * args.heads * args.q_len;
    launch(combine_kernel<T>, "combine_kernel", dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)), 0, args);
  }
}

}  // namespace mplug
