// The forward's key side: its shared memory layout, the visibility of a key tile's keys and the cp.async copies of its K and V rows into a pipeline stage.
#pragma once

#include <cfloat>

#include "mma.cuh"

namespace mplug {

constexpr int kForwardStages = 2;
constexpr int kForwardWarpRows = 16;  // query rows per warp: one m16 MMA tile
constexpr int kForwardMaxWarps = 4;  // forward_warps (attention.h) picks 2 or 4

// Shared memory of the forward: per pipeline stage a swizzled K tile and V tile [kBlockN, D]. After the
// key loop the stages hold the output rows.
template <int D>
struct ForwardSmem {
  static constexpr int kTileBytes = kBlockN * D * 2;
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int keys = 0;
  static constexpr int values = kTileBytes;
  static constexpr int word_slots = kForwardStages * kStageBytes;  // two key tile words (forward_kernel)
  static constexpr size_t bytes = word_slots + 2 * sizeof(uint64_t);
  // 128-row CTAs (forward_kernel with 2 row blocks): then the CTA's swizzled Q rows [128, D] follow
  static constexpr int queries = static_cast<int>(bytes);
  static constexpr size_t tall_bytes = bytes + kForwardMaxWarps * 2 * kForwardWarpRows * D * 2;
  static_assert(kForwardMaxWarps * kForwardWarpRows * D * 2 <= kForwardStages * kStageBytes,
                "the output rows fit the stages");
};

constexpr uint64_t kAllKeys = ~uint64_t{0};

// The visibility word of a tile (bit n: key n of the tile is visible) whose first `count` keys are.
__device__ __forceinline__ uint64_t keys_below(int64_t count) {
  return count >= kBlockN ? kAllKeys : (count <= 0 ? uint64_t{0} : (uint64_t{1} << count) - 1);
}

// Starts copying the key_tile_words word of tile t of a split of `tiles` tiles (`words`: the split's
// first, null without masks) into its shared slot (slot t % 2), by one thread; it lands with the next
// tile's K/V copies, a tile before it is read (landed_tile_word).
__device__ __forceinline__ void fetch_tile_word(const uint64_t* words, int t, int tiles, uint64_t* slots) {
  if (words != nullptr && t < tiles && threadIdx.x == 0) __pipeline_memcpy_async(slots + t % 2, words + t, 8);
}

// The visibility word of tile t (< tiles) of a split: its fetched word where the sources have masks, else
// every key, or `last_word` for the last tile (keys_below its keys before the split's end). (A split
// ends at a multiple of kBlockN or at the last key, where the words end too.)
__device__ __forceinline__ uint64_t landed_tile_word(const uint64_t* words, int t, int tiles, uint64_t last_word,
                                                     const uint64_t* slots) {
  if (words != nullptr) return slots[t % 2];
  return t + 1 < tiles ? kAllKeys : last_word;
}

// Whether a tile of visibility word `word` has no visible key: then it is neither loaded nor computed.
__device__ __forceinline__ bool no_key_visible(uint64_t word) { return word == 0; }

// The scores of the tile's hidden keys (bit clear in `word`) selected out to -inf in every row block: never
// added, so a NaN or inf score (from the query or the key) of a hidden key reaches nothing.
template <int kRowBlocks = 1>
__device__ __forceinline__ void hide_keys(float (&s)[kRowBlocks * kBlockN / 8][4], uint64_t word) {
  const uint64_t lane_word = word >> (2 * lane_in_quad(static_cast<int>(threadIdx.x % 32)));
  // 32-bit halves: single-instruction bit tests
  const uint32_t halves[2] = {static_cast<uint32_t>(lane_word), static_cast<uint32_t>(lane_word >> 32)};
#pragma unroll
  for (int j = 0; j < kBlockN / 8; ++j) {
    const bool first = (halves[j / 4] & (1u << (8 * (j % 4)))) != 0;
    const bool second = (halves[j / 4] & (2u << (8 * (j % 4)))) != 0;
#pragma unroll
    for (int block = 0; block < kRowBlocks; ++block) {
      float* scores = s[block * kBlockN / 8 + j];
      scores[0] = first ? scores[0] : -INFINITY;
      scores[1] = second ? scores[1] : -INFINITY;
      scores[2] = first ? scores[2] : -INFINITY;
      scores[3] = second ? scores[3] : -INFINITY;
    }
  }
}

// issue_tile's test of row n of a tile: bit n of the tile's visibility word.
struct WordVisible {
  uint64_t word;
  __device__ __forceinline__ bool operator()(int row) const { return (word >> row) & 1u; }
};

// issue_tile for a tile with hidden keys or keys of several sources: each row checks its
// visibility (visible(row)) and finds its source. Out of line, as the rare case, so the key loop stays lean.
template <typename T, int D, int kThreadsHere, typename Visible>
MPLUG_NOINLINE __device__ void issue_tile_by_row(const AttentionArgs& args, int64_t b, int64_t h, int64_t k0,
                                                 const Visible visible, unsigned char* stage) {
  constexpr int kChunks = D / 8;
  const ConcatKeys keys = ConcatKeys::of(args);
#pragma unroll 1
  for (int i = threadIdx.x; i < kBlockN * kChunks; i += kThreadsHere) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    unsigned char* k_dst = stage + ForwardSmem<D>::keys + swizzled_offset<D>(row, col);
    unsigned char* v_dst = stage + ForwardSmem<D>::values + swizzled_offset<D>(row, col);
    if (visible(row)) {
      const int64_t key = k0 + row;
      const int s = keys.source_of(key);
      const SourceView& source = args.sources[s];
      __pipeline_memcpy_async(k_dst, element<const T>(source.k, b, key - keys.start(s), h) + col, 16);
      __pipeline_memcpy_async(v_dst, element<const T>(source.v, b, key - keys.start(s), h) + col, 16);
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

  const T* k = nullptr;
  const T* v = nullptr;
  int64_t k_stride = 0;
  int64_t v_stride = 0;
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
  const ConcatKeys keys = ConcatKeys::of(args);
  const int s = keys.source_of(k0);
  const SourceView& source = args.sources[s];
  const int64_t row = k0 - keys.start(s) + Cursor::first_row();
  Cursor cursor;
  cursor.k = element<const T>(source.k, b, row, h) + Cursor::col();
  cursor.v = element<const T>(source.v, b, row, h) + Cursor::col();
  cursor.k_stride = source.k.stride_s;
  cursor.v_stride = source.v.stride_s;
  cursor.end = keys.start(s + 1);
  return cursor;
}

// What the copies of a key tile need of its visibility: whether any and every key is visible, and
// visible(row) for a row.
template <typename Visible>
struct TileVisibility {
  bool any;
  bool all;
  Visible visible;
};

// Starts the 16-byte cp.async copies of the K and V rows of the tile at the cursor (every key visible and
// in the cursor's source) into a stage's swizzled tiles; advances the cursor to the next tile.
template <typename T, int D, int kThreadsHere>
__device__ __forceinline__ void issue_from_cursor(unsigned char* stage, CopyCursor<T, D, kThreadsHere>& cursor) {
  using Cursor = CopyCursor<T, D, kThreadsHere>;
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
  cursor.advance();
}

// Whether the tile [k0, k0 + kBlockN) copies without a call: skipped (no key visible) or straight from
// the cursor (every key visible and in the cursor's source).
template <typename Visible, typename Cursor>
__device__ __forceinline__ bool copies_inline(const TileVisibility<Visible>& tile, int64_t k0, const Cursor& cursor) {
  return !tile.any || (tile.all && k0 + kBlockN <= cursor.end);
}

// Starts the copies of the K and V rows of the tile [k0, k0 + kBlockN) into a stage's swizzled tiles:
// none where no key is visible (the cursor moves on); straight from the cursor when every key is visible
// and in the cursor's source (re-found when the tile starts past it); else row by row (hidden keys,
// padded or past the split, become zero rows, so no NaN in a hidden key or value reaches the products;
// rows may come from different sources). Advances the cursor to the next tile.
template <typename T, int D, int kThreadsHere, typename Visible>
__device__ __forceinline__ void issue_tile(const AttentionArgs& args, int64_t b, int64_t h, int64_t k0,
                                           const TileVisibility<Visible>& tile, unsigned char* stage,
                                           CopyCursor<T, D, kThreadsHere>& cursor) {
  if (!tile.any) return cursor.advance();
  if (k0 >= cursor.end) cursor = cursor_at<T, D, kThreadsHere>(args, b, h, k0);
  if (copies_inline(tile, k0, cursor)) return issue_from_cursor<T, D, kThreadsHere>(stage, cursor);
  issue_tile_by_row<T, D, kThreadsHere>(args, b, h, k0, tile.visible, stage);
  cursor.advance();
}

// The key loop of the forward kernels over the `tiles` key tiles from key lo, whose first tile's visibility
// is `first`: a two-stage cp.async pipeline with one barrier per tile. next_tile(t) waits for tile t's
// copies, runs the barrier that publishes them (and frees tile t - 1's stage) and returns tile t + 1's
// TileVisibility; compute(t) computes tile t. Copies that need a call (row by row, or a cursor re-found)
// are issued between runs of the inner loop, so the loop holding the MMAs has no call.
template <typename T, int D, int kThreadsHere, typename Visible, typename StageOf, typename NextTile,
          typename Compute>
__device__ __forceinline__ void key_loop(const AttentionArgs& args, int64_t b, int64_t h, int64_t lo, int tiles,
                                         const TileVisibility<Visible>& first, const StageOf& stage_of,
                                         const NextTile& next_tile, const Compute& compute) {
  if (tiles == 0) return;
  CopyCursor<T, D, kThreadsHere> cursor;
  issue_tile<T, D, kThreadsHere>(args, b, h, lo, first, stage_of(0), cursor);
  __pipeline_commit();
  int t = 0;
  TileVisibility<Visible> next = next_tile(0);
  for (;;) {
    if (t + 1 < tiles) {
      issue_tile<T, D, kThreadsHere>(args, b, h, lo + int64_t{t + 1} * kBlockN, next, stage_of(t + 1), cursor);
    }
    for (;;) {
      __pipeline_commit();
      compute(t);
      if (++t == tiles) return;
      next = next_tile(t);
      const bool issue = t + 1 < tiles;
      if (issue && !copies_inline(next, lo + int64_t{t + 1} * kBlockN, cursor)) break;
      if (issue && next.any) {
        issue_from_cursor<T, D, kThreadsHere>(stage_of(t + 1), cursor);
      } else {
        cursor.advance();
      }
    }
  }
}

}  // namespace mplug
