// The combine kernel: merges the split-KV partial results of the forward by their lse.
#pragma once

#include "mma.cuh"

namespace mplug {

// Splits of one combine batch: the copies of their partial-output chunks are all issued before any is used.
constexpr int kCombineBatch = 8;
// Dynamic shared memory of the combine, per warp: its normalised split weights, then a 16-byte chunk of each
// lane for each split of a batch.
constexpr size_t kCombineWeightBytes = kMaxSplits * sizeof(float);
constexpr size_t kCombineWarpBytes = kCombineWeightBytes + kCombineBatch * 32 * 16;
constexpr size_t kCombineSmemBytes = kWarps * kCombineWarpBytes;

// Stores 4 consecutive output elements (8 bytes) of one row.
template <typename T>
__device__ __forceinline__ void store_four(T* out, float4 x) {
  *reinterpret_cast<uint2*>(out) = make_uint2(pack_b16x2<T>(x.x, x.y), pack_b16x2<T>(x.z, x.w));
}

// One warp per query row: merges the row's split partial outputs weighted by exp(lse_split - lse_max) / sum.
// The weights go once into the warp's shared slots; then each lane owns 4 columns (head_dim % 4 == 0) and,
// kCombineBatch splits at a time, issues 16-byte cp.async copies of all their chunks into its own shared
// slots before one wait and the FMAs (register loads would be sunk by ptxas to their uses, one in flight).
template <typename T>
__global__ void __launch_bounds__(kThreads) combine_kernel(const AttentionArgs args) {
  static_assert(kMaxSplits == 64 && kMaxSplits % kCombineBatch == 0, "each lane weighs splits lane and lane + 32");
  extern __shared__ __align__(128) unsigned char smem[];
  const int lane = threadIdx.x % 32;
  const int64_t num_bh = args.batch * args.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  if (row >= num_bh * args.q_len) return;
  const int64_t bh = row / args.q_len;
  const int64_t m = row % args.q_len;
  const int splits = args.num_splits;
  const int64_t split_stride = num_bh * args.q_len;
  const float lse_lo = lane < splits ? args.part_lse[lane * split_stride + row] : -INFINITY;
  const float lse_hi = lane + 32 < splits ? args.part_lse[(lane + 32) * split_stride + row] : -INFINITY;
  const float lse_max = warp_max(fmaxf(lse_lo, lse_hi));
  const float w_lo = lane < splits ? merge_weight(lse_lo, lse_max) : 0.0f;
  const float w_hi = lane + 32 < splits ? merge_weight(lse_hi, lse_max) : 0.0f;
  const float weight_sum = warp_sum(w_lo + w_hi);
  const float normalizer = merged_normalizer(weight_sum);
  unsigned char* warp_smem = smem + (threadIdx.x / 32) * kCombineWarpBytes;
  float* weights = reinterpret_cast<float*>(warp_smem);
  float4* staged = reinterpret_cast<float4*>(warp_smem + kCombineWeightBytes) + lane;  // this lane's chunk of split 0
  weights[lane] = w_lo * normalizer;
  weights[lane + 32] = w_hi * normalizer;
  __syncwarp();
  const float* part = args.part_out + row * args.head_dim;
  const int64_t split_step = split_stride * args.head_dim;  // floats from one split's row to the next's
  T* out = element<T>(args.out, bh / args.heads, m, bh % args.heads);
  for (int64_t d = 4 * lane; d < args.head_dim; d += 4 * 32) {
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    for (int s0 = 0; s0 < splits; s0 += kCombineBatch) {
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i) {
        if (s0 + i < splits) __pipeline_memcpy_async(staged + 32 * i, part + (s0 + i) * split_step + d, 16);
      }
      __pipeline_commit();
      __pipeline_wait_prior(0);  // a lane reads back only its own copies
#pragma unroll
      for (int i = 0; i < kCombineBatch; ++i) {
        if (s0 + i < splits) {
          const float w = weights[s0 + i];
          const float4 x = staged[32 * i];
          acc.x = fmaf(w, x.x, acc.x);
          acc.y = fmaf(w, x.y, acc.y);
          acc.z = fmaf(w, x.z, acc.z);
          acc.w = fmaf(w, x.w, acc.w);
        }
      }
    }
    store_four<T>(out + d, acc);
  }
  if (lane == 0) args.lse[row] = merged_lse(lse_max, weight_sum);
}

// The combine of split-KV partial results (none without splits).
template <typename T>
void launch_combine(const AttentionArgs& args) {
  if (args.num_splits == 1) return;
  const int64_t rows = args.batch * args.heads * args.q_len;
  launch(combine_kernel<T>, "combine_kernel", dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)),
         kCombineSmemBytes, args);
}

}  // namespace mplug
