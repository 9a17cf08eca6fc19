// Forward kernels, FlashAttention-2 style: each warp owns 16 query rows whose Q fragments, scores,
// probabilities, output accumulators and softmax statistics stay in registers (mma.sync m16n8k16,
// float32 accumulation; the probabilities are re-used as the A operand of the P V product). K/V
// tiles of 64 keys of the concatenated sources (a tile may span source boundaries) stream through
// swizzled shared memory by a two-stage cp.async pipeline with one barrier per tile and are read
// with ldmatrix (.trans for V). The combine kernel merges split-KV partial results by their lse.
#pragma once

#include <cfloat>

#include "mma.cuh"

namespace mplug {

constexpr int kForwardStages = 2;
constexpr int kForwardWarpRows = 16;  // query rows per warp: one m16 MMA tile
constexpr int kForwardMaxWarps = 4;  // forward_warps (attention.h) picks 2 or 4

// Shared memory of the forward: per pipeline stage a swizzled K tile and V tile [kBlockN, D];
// then three rotating key bias buffers, one float per key: 0 for a visible key, -inf for a hidden
// one (tile t uses buffer t % 3: written one tile ahead, read by the copies and the compute of its
// tile). After the key loop the stages hold the output rows.
template <int D>
struct ForwardSmem {
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int keys = 0;
  static constexpr int values = kTileBytes;
  static constexpr int kFlagBuffers = 3;
  static constexpr int flags = kForwardStages * kStageBytes;
  static constexpr size_t bytes = flags + kFlagBuffers * kBlockN * sizeof(float);
  static_assert(kForwardMaxWarps * kForwardWarpRows * D * 2 <= kForwardStages * kStageBytes,
                "the output rows fit the stages");
};

// Where the sources start in the concatenated key index: source s holds keys [start(s), start(s + 1)).
struct SourceStarts {
  int64_t s1, s2, s3, total;

  __device__ __forceinline__ int source_of(int64_t key) const {
    return static_cast<int>(key >= s1) + static_cast<int>(key >= s2) + static_cast<int>(key >= s3);
  }
  __device__ __forceinline__ int64_t start(int s) const {
    return s == 0 ? 0 : (s == 1 ? s1 : (s == 2 ? s2 : (s == 3 ? s3 : total)));
  }
};

__device__ __forceinline__ SourceStarts source_starts(const AttentionArgs& args) {
  int64_t start[kMaxSources + 1];
  start[0] = 0;
#pragma unroll
  for (int s = 0; s < kMaxSources; ++s) start[s + 1] = start[s] + (s < args.num_sources ? args.sources[s].length : 0);
  return SourceStarts{start[1], start[2], start[3], start[4]};
}

__device__ __forceinline__ bool any_mask(const AttentionArgs& args) {
  bool masked = false;
#pragma unroll
  for (int s = 0; s < kMaxSources; ++s) masked = masked || (s < args.num_sources && args.sources[s].mask != nullptr);
  return masked;
}

// Visibility of the keys k0 + threadIdx.x + j * kThreadsHere (j = 0, 1, ...) of a tile: bit j set
// when the key is below `hi` and not padded in its source's mask. The loads are consumed a tile
// later (store_flags), so their latency hides behind a tile of work. Out of line: only masked
// calls need it.
template <int kThreadsHere>
MPLUG_NOINLINE __device__ uint32_t masked_key_flags(const AttentionArgs& args, int64_t b, int64_t k0, int64_t hi) {
  const SourceStarts starts = source_starts(args);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j * kThreadsHere < kBlockN; ++j) {
    const int n = static_cast<int>(threadIdx.x) + j * kThreadsHere;
    const int64_t key = k0 + n;
    if (n < kBlockN && key < hi) {
      const int s = starts.source_of(key);
      const uint8_t* mask = args.sources[s].mask;
      const bool unmasked = mask == nullptr || mask[b * args.sources[s].mask_stride_b + (key - starts.start(s))] != 0;
      bits |= static_cast<uint32_t>(unmasked) << j;
    }
  }
  return bits;
}

// key_flags of a tile: masked_key_flags where a source has a mask, else whether keys are below `hi`.
template <int kThreadsHere>
__device__ __forceinline__ uint32_t key_flags(const AttentionArgs& args, bool masked, int64_t b, int64_t k0,
                                              int64_t hi) {
  if (masked) return masked_key_flags<kThreadsHere>(args, b, k0, hi);
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j * kThreadsHere < kBlockN; ++j) {
    const int n = static_cast<int>(threadIdx.x) + j * kThreadsHere;
    bits |= static_cast<uint32_t>(n < kBlockN && k0 + n < hi) << j;
  }
  return bits;
}

// The bits key_flags returns for a tile whose keys are all visible.
template <int kThreadsHere>
__device__ __forceinline__ uint32_t all_flags() {
  uint32_t bits = 0;
#pragma unroll
  for (int j = 0; j * kThreadsHere < kBlockN; ++j) {
    bits |= static_cast<uint32_t>(threadIdx.x + j * kThreadsHere < kBlockN) << j;
  }
  return bits;
}

// Writes this thread's keys of a tile to its key bias buffer: 0 where visible, -inf where hidden.
template <int kThreadsHere>
__device__ __forceinline__ void store_flags(uint32_t bits, float* bias) {
#pragma unroll
  for (int j = 0; j * kThreadsHere < kBlockN; ++j) {
    const int n = static_cast<int>(threadIdx.x) + j * kThreadsHere;
    if (n < kBlockN) bias[n] = (bits >> j) & 1u ? 0.0f : -INFINITY;
  }
}

// issue_tile for a tile with hidden keys or keys of several sources: each row checks its
// visibility and finds its source. Out of line, as the rare case, so the key loop stays lean.
template <typename T, int D, int kThreadsHere>
MPLUG_NOINLINE __device__ void issue_tile_by_row(const AttentionArgs& args, int64_t b, int64_t h, int64_t k0,
                                                 const float* bias, unsigned char* stage) {
  constexpr int kChunks = D / 8;
  const SourceStarts starts = source_starts(args);
#pragma unroll 1
  for (int i = threadIdx.x; i < kBlockN * kChunks; i += kThreadsHere) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    unsigned char* k_dst = stage + ForwardSmem<D>::keys + swizzled_offset<D>(row, col);
    unsigned char* v_dst = stage + ForwardSmem<D>::values + swizzled_offset<D>(row, col);
    if (bias[row] == 0.0f) {
      const int64_t key = k0 + row;
      const int s = starts.source_of(key);
      const SourceView& source = args.sources[s];
      __pipeline_memcpy_async(k_dst, element<const T>(source.k, b, key - starts.start(s), h) + col, 16);
      __pipeline_memcpy_async(v_dst, element<const T>(source.v, b, key - starts.start(s), h) + col, 16);
    } else {
      *reinterpret_cast<uint4*>(k_dst) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(v_dst) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// This thread's first K and V copy of a tile in one source (row first_row, column col of the
// tile), and how far its copies and the next tile lie; valid for tiles that end by `end`.
template <typename T, int D, int kThreadsHere>
struct CopyCursor {
  static constexpr int kChunks = D / 8;
  // copies of one thread: rows first_row + j * kRowStep at one column where the threads cover
  // whole rows (D / 8 divides the thread count), else chunks threadIdx.x + j * kThreadsHere
  static constexpr bool kColumnPerThread = kThreadsHere % kChunks == 0;
  static constexpr int kRowStep = kColumnPerThread ? kThreadsHere / kChunks : 1;
  static constexpr int kCopies = kBlockN * kChunks / kThreadsHere;
  static_assert(kBlockN * kChunks % kThreadsHere == 0, "every thread copies the same number of chunks");

  const T* k;
  const T* v;
  int64_t k_stride;
  int64_t v_stride;
  int64_t end = -1;

  __device__ __forceinline__ static int first_row() {
    return kColumnPerThread ? static_cast<int>(threadIdx.x) / kChunks : 0;
  }
  __device__ __forceinline__ static int col() {
    return kColumnPerThread ? static_cast<int>(threadIdx.x) % kChunks * 8 : 0;
  }

  __device__ __forceinline__ void advance() {
    k += kBlockN * k_stride;
    v += kBlockN * v_stride;
  }
};

// The cursor of the tile starting at key k0, in the source holding k0. Out of line: once per source.
template <typename T, int D, int kThreadsHere>
MPLUG_NOINLINE __device__ CopyCursor<T, D, kThreadsHere> cursor_at(const AttentionArgs& args, int64_t b, int64_t h,
                                                                    int64_t k0) {
  using Cursor = CopyCursor<T, D, kThreadsHere>;
  const SourceStarts starts = source_starts(args);
  const int s = starts.source_of(k0);
  const SourceView& source = args.sources[s];
  const int64_t row = k0 - starts.start(s) + Cursor::first_row();
  Cursor cursor;
  cursor.k = element<const T>(source.k, b, row, h) + Cursor::col();
  cursor.v = element<const T>(source.v, b, row, h) + Cursor::col();
  cursor.k_stride = source.k.stride_s;
  cursor.v_stride = source.v.stride_s;
  cursor.end = starts.start(s + 1);
  return cursor;
}

// Starts the 16-byte cp.async copies of the K and V rows of the tile [k0, k0 + kBlockN) into a
// stage's swizzled tiles: straight from the cursor when every key is visible and in the cursor's
// source, else row by row (hidden keys, padded or past the split, become zero rows, so no NaN in
// a hidden key or value reaches the products; rows may come from different sources). Advances
// the cursor to the next tile.
template <typename T, int D, int kThreadsHere>
__device__ __forceinline__ void issue_tile(const AttentionArgs& args, int64_t b, int64_t h, int64_t k0,
                                           bool all_visible, const float* bias, unsigned char* stage,
                                           CopyCursor<T, D, kThreadsHere>& cursor) {
  using Cursor = CopyCursor<T, D, kThreadsHere>;
  if (k0 >= cursor.end) cursor = cursor_at<T, D, kThreadsHere>(args, b, h, k0);
  if (all_visible && k0 + kBlockN <= cursor.end) {
#pragma unroll Cursor::kColumnPerThread ? Cursor::kCopies : 4
    for (int j = 0; j < Cursor::kCopies; ++j) {
      int row, col;
      int64_t k_offset, v_offset;
      if constexpr (Cursor::kColumnPerThread) {
        row = Cursor::first_row() + j * Cursor::kRowStep;
        col = Cursor::col();
        k_offset = j * Cursor::kRowStep * cursor.k_stride;
        v_offset = j * Cursor::kRowStep * cursor.v_stride;
      } else {
        const int i = static_cast<int>(threadIdx.x) + j * kThreadsHere;
        row = i / Cursor::kChunks;
        col = i % Cursor::kChunks * 8;
        k_offset = row * cursor.k_stride + col;
        v_offset = row * cursor.v_stride + col;
      }
      __pipeline_memcpy_async(stage + ForwardSmem<D>::keys + swizzled_offset<D>(row, col), cursor.k + k_offset, 16);
      __pipeline_memcpy_async(stage + ForwardSmem<D>::values + swizzled_offset<D>(row, col), cursor.v + v_offset, 16);
    }
  } else {
    issue_tile_by_row<T, D, kThreadsHere>(args, b, h, k0, bias, stage);
  }
  cursor.advance();
}

// The registers of one warp: Q fragments of its 16 rows, the output accumulators and the running
// softmax of rows g and g + 8 of this lane (g = lane / 4).
template <int D>
struct WarpState {
  uint32_t q[D / 16][4];
  float o[D / 8][4];
  RunningSoftmax rows[2];
};

// Loads the A fragments of query rows [row0, row0 + 16) straight from global memory (rows past
// q_len read as zeros); each lane takes its 32-bit pairs. `sign` (0x80008000 or 0) negates Q
// exactly, so that a negative softmax scale becomes a positive one.
template <typename T, int D>
__device__ __forceinline__ void load_queries(const AttentionArgs& args, int64_t b, int64_t h, int64_t row0,
                                             uint32_t sign, uint32_t (&q)[D / 16][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t row = row0 + lane_quad(lane) + 8 * (i % 2);
    const T* q_row = element<const T>(args.q, b, row < args.q_len ? row : 0, h);
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      const int col = 16 * ks + 2 * lane_in_quad(lane) + 8 * (i / 2);
      q[ks][i] = row < args.q_len ? *reinterpret_cast<const uint32_t*>(q_row + col) ^ sign : 0u;
    }
  }
}

// S = Q K^T for the warp's 16 rows and the tile's 64 keys: s[j] holds keys 8j .. 8j + 7.
template <typename T, int D>
__device__ __forceinline__ void tile_scores(const uint32_t (&q)[D / 16][4], const unsigned char* keys,
                                            float (&s)[kBlockN / 8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
    for (int n16 = 0; n16 < kBlockN / 16; ++n16) {
      uint32_t k[4];
      ldmatrix<4>(k, keys + swizzled_offset<D>(16 * n16 + x4_row_b(lane), 16 * ks + x4_col_b(lane)));
      mma_m16n8k16<T>(s[2 * n16], q[ks], {k[0], k[1]});
      mma_m16n8k16<T>(s[2 * n16 + 1], q[ks], {k[2], k[3]});
    }
  }
}

// Adds the key bias (-inf for hidden keys) to the scores. A hidden key's K row is zeros (never
// loaded), so its score is 0 (or NaN where the query row holds inf or NaN, a NaN row anyway):
// a NaN stored in a hidden key never reaches the row.
__device__ __forceinline__ void add_key_bias(float (&s)[kBlockN / 8][4], const float* bias) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const float2 pair = *reinterpret_cast<const float2*>(bias + 8 * j + 2 * lane_in_quad(lane));
    s[j][0] += pair.x;
    s[j][1] += pair.y;
    s[j][2] += pair.x;
    s[j][3] += pair.y;
  }
}

// Folds the tile's scores into the running softmax of rows g and g + 8 (maxima reduced within the
// lane's quad by two shuffles), rescales the output accumulators and turns s into probabilities.
// Scores are unscaled, scale_log2 >= 0; row sums stay per lane until the end.
template <int D>
__device__ __forceinline__ void online_softmax(float (&s)[kBlockN / 8][4], float scale_log2, WarpState<D>& warp) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float tile_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
    float shift;
    const float alpha = rescale_for_tile(warp.rows[r], tile_max * scale_log2, &shift);
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        s[j][2 * r + c] = exp2_approx(fmaf(s[j][2 * r + c], scale_log2, -shift));
        sum += s[j][2 * r + c];
      }
    }
    warp.rows[r].sum += sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      warp.o[n][2 * r] *= alpha;
      warp.o[n][2 * r + 1] *= alpha;
    }
  }
}

// O += P V: the probabilities, packed to T, are the A fragments; V comes by ldmatrix .trans.
template <typename T, int D>
__device__ __forceinline__ void accumulate_values(const float (&p)[kBlockN / 8][4], const unsigned char* values,
                                                  float (&o)[D / 8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k16 = 0; k16 < kBlockN / 16; ++k16) {
    const uint32_t a[4] = {pack_b16x2<T>(p[2 * k16][0], p[2 * k16][1]), pack_b16x2<T>(p[2 * k16][2], p[2 * k16][3]),
                           pack_b16x2<T>(p[2 * k16 + 1][0], p[2 * k16 + 1][1]),
                           pack_b16x2<T>(p[2 * k16 + 1][2], p[2 * k16 + 1][3])};
#pragma unroll
    for (int d16 = 0; d16 < D / 16; ++d16) {
      uint32_t v[4];
      ldmatrix_trans<4>(v, values + swizzled_offset<D>(16 * k16 + x4_row(lane), 16 * d16 + x4_col(lane)));
      mma_m16n8k16<T>(o[2 * d16], a, {v[0], v[1]});
      mma_m16n8k16<T>(o[2 * d16 + 1], a, {v[2], v[3]});
    }
  }
}

// Quad-reduces the row sums and writes the warp's rows: normalised T output by 16-byte stores
// (staged through the warp's own `scratch`) and lse, or the float partials of a split.
template <typename T, int D>
__device__ __forceinline__ void write_rows(const AttentionArgs& args, int64_t b, int64_t h, int64_t row0,
                                           WarpState<D>& warp, unsigned char* scratch) {
  const int lane = threadIdx.x % 32;
  const int64_t bh = b * args.heads + h;
  const int64_t split_row0 = (blockIdx.y * args.batch * args.heads + bh) * args.q_len;
  float normalizer[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    warp.rows[r].sum += __shfl_xor_sync(0xffffffffu, warp.rows[r].sum, 1);
    warp.rows[r].sum += __shfl_xor_sync(0xffffffffu, warp.rows[r].sum, 2);
    normalizer[r] = row_normalizer(warp.rows[r]);
    const int64_t m = row0 + lane_quad(lane) + 8 * r;
    if (lane_in_quad(lane) == 0 && m < args.q_len) {
      (args.num_splits == 1 ? args.lse + bh * args.q_len : args.part_lse + split_row0)[m] = row_lse(warp.rows[r]);
    }
  }
  if (args.num_splits > 1) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int64_t m = row0 + lane_quad(lane) + 8 * r;
      if (m >= args.q_len) continue;
      float* part = args.part_out + (split_row0 + m) * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        *reinterpret_cast<float2*>(part + 8 * n + 2 * lane_in_quad(lane)) =
            make_float2(warp.o[n][2 * r] * normalizer[r], warp.o[n][2 * r + 1] * normalizer[r]);
      }
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const uint32_t pair = pack_b16x2<T>(warp.o[n][2 * r] * normalizer[r], warp.o[n][2 * r + 1] * normalizer[r]);
      *reinterpret_cast<uint32_t*>(scratch + swizzled_offset<D>(lane_quad(lane) + 8 * r, 8 * n) +
                                   4 * lane_in_quad(lane)) = pair;
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = lane; i < kForwardWarpRows * kChunks; i += 32) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    if (row0 + row < args.q_len) {
      *reinterpret_cast<uint4*>(element<T>(args.out, b, row0 + row, h) + col) =
          *reinterpret_cast<const uint4*>(scratch + swizzled_offset<D>(row, col));
    }
  }
}

// grid (B * H * query tiles, splits), query tiles of one (batch, head) adjacent: the kWarps * 16
// query rows of one tile over the keys [split * split_size, (split + 1) * split_size) of the
// concatenated sources (the last split: to the end). Tiles of 64 keys may span source boundaries. One barrier per tile: it
// publishes tile t (landed, with tile t + 1's visibility) and frees tile t - 1's stage.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) forward_kernel(const __grid_constant__ AttentionArgs args) {
  constexpr int kThreadsHere = kWarps * 32;
  using Smem = ForwardSmem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int64_t query_tiles = (args.q_len + kWarps * kForwardWarpRows - 1) / (kWarps * kForwardWarpRows);
  const int64_t bh = blockIdx.x / query_tiles;
  const int64_t b = bh / args.heads;
  const int64_t h = bh % args.heads;
  const int64_t kv_h = h / args.kv_group();  // grouped heads: K/V read in place, no copies
  const int warp_index = threadIdx.x / 32;
  const int64_t row0 = (blockIdx.x % query_tiles) * (kWarps * kForwardWarpRows) + warp_index * kForwardWarpRows;
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

  WarpState<D> warp;
  load_queries<T, D>(args, b, h, row0, args.scale < 0.0f ? 0x80008000u : 0u, warp.q);
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) warp.o[n][i] = 0.0f;
  }
  warp.rows[0] = warp.rows[1] = empty_softmax();

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
    float s[kBlockN / 8][4];
    tile_scores<T, D>(warp.q, stage_of(t) + Smem::keys, s);
    if (!visible) add_key_bias(s, bias);
    online_softmax<D>(s, scale_log2, warp);
    accumulate_values<T, D>(s, stage_of(t) + Smem::values, warp.o);
  }
  // every warp is done with the stages before they hold output rows
  __syncthreads();
  if (row0 < args.q_len) write_rows<T, D>(args, b, h, row0, warp, smem + warp_index * kForwardWarpRows * D * 2);
}

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

// Calls body(forward_kernel<T, D, warps>, threads) for the head dim and query length of `args`.
template <typename T, typename Body>
void with_forward_kernel(int64_t head_dim, int64_t q_len, Body&& body) {
  dispatch_head_dim(head_dim, [&](auto head_dim_constant) {
    constexpr int D = decltype(head_dim_constant)::value;
    // only the warp counts forward_warps picks for D are instantiated
    if constexpr (forward_warps(D, 1) == 2) {
      if (forward_warps(D, q_len) == 2) return body(forward_kernel<T, D, 2>, 64, ForwardSmem<D>::bytes);
    }
    return body(forward_kernel<T, D, kForwardMaxWarps>, kForwardMaxWarps * 32, ForwardSmem<D>::bytes);
  });
}

// The combine of split-KV partial results (none without splits).
template <typename T>
void launch_combine(const AttentionArgs& args) {
  if (args.num_splits == 1) return;
  const int64_t rows = args.batch * args.heads * args.q_len;
  launch(combine_kernel<T>, "combine_kernel", dim3(static_cast<unsigned>((rows + kWarps - 1) / kWarps)),
         kCombineSmemBytes, args);
}

template <typename T>
void forward_for_type(const AttentionArgs& args) {
  with_forward_kernel<T>(args.head_dim, args.q_len, [&](auto kernel, int threads, size_t smem_bytes) {
    const int64_t rows_per_cta = threads / 32 * kForwardWarpRows;
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
