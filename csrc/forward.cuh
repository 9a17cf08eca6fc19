// Forward kernels, FlashAttention-2 style: each warp owns 16 or 32 query rows (one or two m16 row
// blocks) whose scores, probabilities, output accumulators and softmax statistics stay in registers
// (mma.sync m16n8k16, float32 accumulation; the probabilities are re-used as the A operand of the P V
// product), and its Q fragments too, except for 32-row warps from D = 64 on, which read them from shared
// memory. K/V tiles of 64 keys of the concatenated sources (a tile may span source boundaries) stream
// through swizzled shared memory by a two-stage cp.async pipeline with one barrier per tile and are read
// with ldmatrix (.trans for V), each fragment by every row block of the warp.
// The combine kernel merges split-KV partial results by their lse.
#pragma once

#include "combine.cuh"
#include "forward_warp.cuh"
#include "key_tile_words.cuh"

namespace mplug {

// grid (B * H * query tiles, splits), query tiles of one (batch, head) adjacent: the kWarps * kRowBlocks * 16
// query rows of one tile over the keys [split * split_size, (split + 1) * split_size) of the
// concatenated sources (the last split: to the end). Tiles of 64 keys may span source boundaries. One barrier per tile: it
// publishes tile t (landed) and frees tile t - 1's stage; a tile's visibility word is loaded a tile ahead.
// A tile without a visible key is skipped; a query row that sees no key (every key padded) ends with
// output 0 and lse -inf, whatever its query holds.
template <typename T, int D, int kWarps, int kRowBlocks = 1>
__global__ void __launch_bounds__(kWarps * 32, forward_min_ctas_per_sm(D, kWarps))
    forward_kernel(const __grid_constant__ AttentionArgs args) {
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
  const ConcatKeys keys = ConcatKeys::of(args);
  const int64_t lo = static_cast<int64_t>(blockIdx.y) * args.split_size;
  // the last split holds every key left (split_plan merges a sliver into it)
  const int64_t hi = blockIdx.y + 1 == args.num_splits ? keys.total : min(lo + args.split_size, keys.total);
  const int tiles = hi > lo ? static_cast<int>((hi - lo + kBlockN - 1) / kBlockN) : 0;
  // |scale| (Q is negated for a negative scale), at least FLT_MIN so that -inf * scale stays -inf
  const float scale_log2 = fmaxf(fabsf(args.scale) * kLog2e, FLT_MIN);
  auto stage_of = [&](int t) { return smem + (t % kForwardStages) * Smem::kStageBytes; };
  // the split's first key tile word (null without masks)
  const uint64_t* words = args.key_tile_words == nullptr
                              ? nullptr
                              : args.key_tile_words + b * keys.tile_count() + lo / kBlockN;
  const uint64_t last_word = keys_below(hi - lo - int64_t{tiles - 1} * kBlockN);

  // Q: in registers, but in shared memory for 32-row warps from D = 64 on (the registers go to the second row
  // block's scores and accumulators; Q in registers spilled there)
  const uint32_t sign = args.scale < 0.0f ? 0x80008000u : 0u;
  const auto queries = [&] {
    if constexpr (kRowBlocks == 1 || D <= 32) {
      RegisterQueries<D, kRowBlocks> in_registers;
      load_queries<T, D, kRowBlocks>(args, b, h, row0, sign, in_registers);
      return in_registers;
    } else {
      unsigned char* rows = smem + Smem::queries + warp_index * kWarpRows * D * 2;
      stage_queries<T, D>(args, b, h, row0, sign, rows);
      return SharedQueries<D>{rows};
    }
  }();
  WarpState<D, kRowBlocks> warp;
#pragma unroll
  for (int n = 0; n < kRowBlocks * D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) warp.o[n][i] = 0.0f;
  }
#pragma unroll
  for (int r = 0; r < 2 * kRowBlocks; ++r) warp.rows[r] = empty_softmax();

  auto visibility = [](uint64_t tile_word) {
    return TileVisibility<WordVisible>{!no_key_visible(tile_word), tile_word == kAllKeys, WordVisible{tile_word}};
  };
  // the words of tiles t (word) and t + 1 (next_word); tile t + 2's lands in shared memory with tile t + 1
  uint64_t* word_slots = reinterpret_cast<uint64_t*>(smem + Smem::word_slots);
  uint64_t word = 0;
  uint64_t next_word = words == nullptr ? (tiles > 1 ? kAllKeys : last_word) : (tiles > 0 ? words[0] : 0);
  fetch_tile_word(words, 1, tiles, word_slots);
  auto next_tile = [&](int t) {
    __pipeline_wait_prior(0);
    __syncthreads();
    word = next_word;
    next_word = landed_tile_word(words, t + 1, tiles, last_word, word_slots);
    fetch_tile_word(words, t + 2, tiles, word_slots);
    return visibility(next_word);
  };
  auto compute = [&](int t) {
    // a tile without a visible key is neither loaded nor computed; a warp past the queries only helps to load
    if (no_key_visible(word) || row0 >= args.q_len) return;
    float s[kRowBlocks * kBlockN / 8][4];
    tile_scores<T, D, kRowBlocks>(queries, stage_of(t) + Smem::keys, s);
    if (word != kAllKeys) hide_keys<kRowBlocks>(s, word);
    online_softmax<D, kRowBlocks>(s, scale_log2, warp);
    accumulate_values<T, D, kRowBlocks>(s, stage_of(t) + Smem::values, warp.o);
  };
  key_loop<T, D, kThreadsHere>(args, b, kv_h, lo, tiles, visibility(next_word), stage_of, next_tile, compute);
  // every warp is done with the stages before they hold output rows
  __syncthreads();
  if (row0 < args.q_len) write_rows<T, D, kRowBlocks>(args, b, h, row0, warp, smem + warp_index * kWarpRows * D * 2);
}

// forward_kernel by element type, head dim, warps and row blocks, its name and its shared memory bytes; it has
// 128-row CTAs (kTallRows: forward_row_blocks, attention.h).
struct PlainForward {
  static constexpr const char* kName = "forward_kernel";
  static constexpr bool kTallRows = true;
  template <typename T, int D, int kWarps, int kRowBlocks = 1>
  static constexpr auto kernel() { return forward_kernel<T, D, kWarps, kRowBlocks>; }
  template <int D, int kRowBlocks = 1>
  static constexpr size_t smem_bytes() { return kRowBlocks == 1 ? ForwardSmem<D>::bytes : ForwardSmem<D>::tall_bytes; }
};

// Calls body(kernel, threads, shared bytes) with Kernel's kernel for the head dim and query length of `args`
// (forward_warps and, where Kernel has kTallRows, forward_row_blocks: attention.h).
template <typename T, typename Kernel = PlainForward, typename Body>
void with_forward_kernel(int64_t head_dim, int64_t q_len, Body&& body) {
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    // only the warp and row-block counts that attention.h picks for D are instantiated
    if constexpr (forward_warps(D, 1) == 2) {
      if (forward_warps(D, q_len) == 2) {
        return body(Kernel::template kernel<T, D, 2>(), 64, Kernel::template smem_bytes<D>());
      }
    }
    if constexpr (Kernel::kTallRows && forward_row_blocks(D, kForwardTallQueries) == 2) {
      if (forward_row_blocks(D, q_len) == 2) {
        return body(Kernel::template kernel<T, D, kForwardMaxWarps, 2>(), kForwardMaxWarps * 32,
                    Kernel::template smem_bytes<D, 2>());
      }
    }
    return body(Kernel::template kernel<T, D, kForwardMaxWarps>(), kForwardMaxWarps * 32,
                Kernel::template smem_bytes<D>());
  });
}

// Launches Kernel's kernel over `args` (grid as forward_kernel's), then the split-KV combine.
template <typename T, typename Kernel = PlainForward>
void forward_for_type(const AttentionArgs& args) {
  with_forward_kernel<T, Kernel>(args.head_dim, args.q_len, [&](auto kernel, int threads, size_t smem_bytes) {
    const int64_t rows_per_cta = forward_rows_per_cta(args.head_dim, args.q_len, !Kernel::kTallRows);
    const int64_t query_tiles = (args.q_len + rows_per_cta - 1) / rows_per_cta;
    const dim3 grid(static_cast<unsigned>(args.batch * args.heads * query_tiles),
                    static_cast<unsigned>(args.num_splits));
    launch(kernel, Kernel::kName, grid, threads, smem_bytes, args);
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
