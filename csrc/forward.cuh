// Forward kernels, FlashAttention-2 style: each warp owns 16 or 32 query rows (one or two m16 row
// blocks) whose Q fragments, scores, probabilities, output accumulators and softmax statistics stay in
// registers (mma.sync m16n8k16, float32 accumulation; the probabilities are re-used as the A operand
// of the P V product). K/V tiles of 64 keys of the concatenated sources (a tile may span source
// boundaries) stream through swizzled shared memory by a two-stage cp.async pipeline with one barrier
// per tile and are read with ldmatrix (.trans for V), each fragment by every row block of the warp.
// The combine kernel merges split-KV partial results by their lse.
#pragma once

#include "combine.cuh"
#include "forward_warp.cuh"

namespace mplug {

// grid (B * H * query tiles, splits), query tiles of one (batch, head) adjacent: the kWarps * kRowBlocks * 16
// query rows of one tile over the keys [split * split_size, (split + 1) * split_size) of the
// concatenated sources (the last split: to the end). Tiles of 64 keys may span source boundaries. One barrier per tile: it
// publishes tile t (landed, with tile t + 1's visibility) and frees tile t - 1's stage.
template <typename T, int D, int kWarps, int kRowBlocks = 1>
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(const __grid_constant__ AttentionArgs args) {
  constexpr int kThreadsHere = kWarps * 32;
  constexpr int kWarpRows = kRowBlocks * kForwardWarpRows;
  using Smem = ForwardSmem<D>;
  static_assert(kWarps * kWarpRows * D * 2 <= kForwardStages * Smem::kStageBytes, "the output rows fit the stages");
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t query_tiles = (args.q_len + kWarps * kWarpRows - 1) / (kWarps * kWarpRows);
  const int64_t bh = blockIdx.x / query_tiles;
  const int64_t b = bh / args.heads;
  const int64_t h = bh % args.heads;
  const int64_t kv_h = h / args.kv_group();  // grouped heads: K/V read in place, no copies
  const int warp_index = threadIdx.x / 32;
  const int64_t row0 = (blockIdx.x % query_tiles) * (kWarps * kWarpRows) + warp_index * kWarpRows;
  const SourceStarts starts = source_starts(args);
  const bool masked = any_mask(args);
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * args.split_size;
  // the last split holds every key left (split_plan merges a sliver into it)
  const int64_t hi = blockIdx.y + 1 == args.num_splits ? starts.total : min(lo + args.split_size, starts.total);
  const int tiles = hi > lo ? static_cast<int>((hi - lo + kBlockN - 1) / kBlockN) : 0;
  // |scale| (Q is negated for a negative scale), at least FLT_MIN so that -inf * scale stays -inf
  const float scale_log2 = fmaxf(fabsf(args.scale) * kLog2e, FLT_MIN);
  auto stage_of = [&](int t) { return smem + (t % kForwardStages) * Smem::kStageBytes; };
  // flag buffer of tile t: t % 3, counted incrementally
  auto flags_at = [&](int buffer) { return reinterpret_cast<float*>(smem + Smem::flags) + buffer * kBlockN; };
  auto following = [](int buffer) { return buffer + 1 == Smem::kFlagBuffers ? 0 : buffer + 1; };

  WarpState<D, kRowBlocks> warp;
  load_queries<T, D, kRowBlocks>(args, b, h, row0, args.scale < 0.0f ? 0x80008000u : 0u, warp.q);
#pragma unroll
  for (int n = 0; n < kRowBlocks * D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) warp.o[n][i] = 0.0f;
  }
#pragma unroll
  for (int r = 0; r < 2 * kRowBlocks; ++r) warp.rows[r] = empty_softmax();

  uint32_t flags = key_flags<kThreadsHere>(args, masked, b, lo, hi);
  CopyCursor<T, D, kThreadsHere> cursor;
  int buffer = 0;
  store_flags<kThreadsHere>(flags, flags_at(buffer));
  bool next_visible = __syncthreads_and(flags == all_flags<kThreadsHere>());
  if (tiles > 0) {
    issue_tile<T, D, kThreadsHere>(args, b, kv_h, lo, next_visible, flags_at(buffer), stage_of(0), cursor);
  }
  __pipeline_commit();
  flags = key_flags<kThreadsHere>(args, masked, b, lo + kBlockN, hi);
  for (int t = 0; t < tiles; ++t) {
    const bool visible = next_visible;
    const int next_buffer = following(buffer);
    __pipeline_wait_prior(0);
    store_flags<kThreadsHere>(flags, flags_at(next_buffer));
    next_visible = __syncthreads_and(flags == all_flags<kThreadsHere>());
    if (t + 1 < tiles) {
      issue_tile<T, D, kThreadsHere>(args, b, kv_h, lo + int64_t{t + 1} * kBlockN, next_visible,
                                     flags_at(next_buffer), stage_of(t + 1), cursor);
      flags = key_flags<kThreadsHere>(args, masked, b, lo + int64_t{t + 2} * kBlockN, hi);
    }
    __pipeline_commit();
    const float* bias = flags_at(buffer);
    buffer = next_buffer;
    if (row0 >= args.q_len) continue;  // a warp past the queries only helps to load
    float s[kRowBlocks * kBlockN / 8][4];
    tile_scores<T, D, kRowBlocks>(warp.q, stage_of(t) + Smem::keys, s);
    if (!visible) add_key_bias<kRowBlocks>(s, bias);
    online_softmax<D, kRowBlocks>(s, scale_log2, warp);
    accumulate_values<T, D, kRowBlocks>(s, stage_of(t) + Smem::values, warp.o);
  }
  // every warp is done with the stages before they hold output rows
  __syncthreads();
  if (row0 < args.q_len) write_rows<T, D, kRowBlocks>(args, b, h, row0, warp, smem + warp_index * kWarpRows * D * 2);
}

// Calls body(forward_kernel<T, D, warps, row blocks>, threads, shared bytes) for the head dim and query length
// of `args` (forward_warps and forward_row_blocks, attention.h).
template <typename T, typename Body>
void with_forward_kernel(int64_t head_dim, int64_t q_len, Body&& body) {
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    // only the warp and row-block counts that attention.h picks for D are instantiated
    if constexpr (forward_warps(D, 1) == 2) {
      if (forward_warps(D, q_len) == 2) return body(forward_kernel<T, D, 2>, 64, ForwardSmem<D>::bytes);
    }
    if constexpr (forward_row_blocks(D, kForwardTallQueries) == 2) {
      if (forward_row_blocks(D, q_len) == 2) {
        return body(forward_kernel<T, D, kForwardMaxWarps, 2>, kForwardMaxWarps * 32, ForwardSmem<D>::bytes);
      }
    }
    return body(forward_kernel<T, D, kForwardMaxWarps>, kForwardMaxWarps * 32, ForwardSmem<D>::bytes);
  });
}

template <typename T>
void forward_for_type(const AttentionArgs& args) {
  with_forward_kernel<T>(args.head_dim, args.q_len, [&](auto kernel, int threads, size_t smem_bytes) {
    const int64_t rows_per_cta = forward_rows_per_cta(args.head_dim, args.q_len);
    const int64_t query_tiles = (args.q_len + rows_per_cta - 1) / rows_per_cta;
    const dim3 grid(static_cast<unsigned>(args.batch * args.heads * query_tiles),
                    static_cast<unsigned>(args.num_splits));
    launch(kernel, "forward_kernel", grid, threads, smem_bytes, args);
  });
  launch_combine<T>(args);
}

// CTAs of the forward kernel for (head_dim, q_len) resident on one multiprocessor.
template <typename T>
int forward_ctas_per_sm_for_type(int64_t head_dim, int64_t q_len) {
  int ctas = 0;
  with_forward_kernel<T>(head_dim, q_len, [&](auto kernel, int threads, size_t smem_bytes) {
    ctas = ctas_per_multiprocessor(kernel, "forward_kernel", threads, smem_bytes);
  });
  return ctas;
}

}  // namespace mplug
