// The forward's key side: its shared memory layout, where the sources start, the visibility of a
// key tile's keys and the cp.async copies of its K and V rows into a pipeline stage.
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

}  // namespace mplug
