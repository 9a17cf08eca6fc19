// The backward's key side: K and V of a 64-key tile of the concatenated keys (csrc/key_tiles.h) copied
// into swizzled shared-memory tiles, each row from its own source, and the finished dK and dV rows
// written back to their own sources.
#pragma once

#include "mma.cuh"

namespace mplug {
namespace backward {

// Starts the 16-byte cp.async copies of K and V of key tile `tile` into swizzled [kBlockN, D] tiles:
// from one base when the tile lies in one source, else each row from its own source; rows where
// keep(n) is false (masked keys, keys past the tile) become zero rows, so what they hold reaches no MMA.
template <typename T, int D, typename Keep>
__device__ __forceinline__ void issue_key_tile(const AttentionArgs& args, const ConcatKeys& keys, const KeyTile& tile,
                                               int64_t b, int64_t h, unsigned char* k_tile, unsigned char* v_tile,
                                               const Keep& keep) {
  constexpr int kChunks = D / 8;
  const KeyRow first = keys.locate(tile.start);
  const bool one_source = tile.end <= keys.start(first.source + 1);
  const SourceView& home = args.sources[first.source];
  const T* k_rows = element<const T>(home.k, b, first.row, h);
  const T* v_rows = element<const T>(home.v, b, first.row, h);
  for (int i = threadIdx.x; i < kBlockN * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int col = (i % kChunks) * 8;
    unsigned char* k_row = k_tile + swizzled_offset<D>(row, col);
    unsigned char* v_row = v_tile + swizzled_offset<D>(row, col);
    if (!keep(row)) {
      *reinterpret_cast<uint4*>(k_row) = make_uint4(0u, 0u, 0u, 0u);
      *reinterpret_cast<uint4*>(v_row) = make_uint4(0u, 0u, 0u, 0u);
    } else if (one_source) {
      __pipeline_memcpy_async(k_row, k_rows + row * home.k.stride_s + col, 16);
      __pipeline_memcpy_async(v_row, v_rows + row * home.v.stride_s + col, 16);
    } else {
      const KeyRow at = keys.locate(tile.start + row);
      const SourceView& source = args.sources[at.source];
      __pipeline_memcpy_async(k_row, element<const T>(source.k, b, at.row, h) + col, 16);
      __pipeline_memcpy_async(v_row, element<const T>(source.v, b, at.row, h) + col, 16);
    }
  }
}

// Copies the finished dK and dV rows of key tile `tile` (swizzled) to their own sources' dk and dv with
// 16-byte stores.
template <typename T, int D>
__device__ __forceinline__ void store_key_gradients(const AttentionArgs& args, const KeyTile& tile, int64_t b,
                                                    int64_t h, const unsigned char* dk_tile,
                                                    const unsigned char* dv_tile) {
  constexpr int kChunks = D / 8;
  const ConcatKeys keys = ConcatKeys::of(args);  // from args again: not held in registers through the loop
  const int64_t valid = tile.end - tile.start;
  for (int i = threadIdx.x; i < kBlockN * kChunks; i += kThreads) {
    const int row = i / kChunks;
    const int col = (i % kChunks) * 8;
    if (row < valid) {
      const KeyRow at = keys.locate(tile.start + row);
      const SourceView& source = args.sources[at.source];
      *reinterpret_cast<uint4*>(element<T>(source.dk, b, at.row, h) + col) =
          *reinterpret_cast<const uint4*>(dk_tile + swizzled_offset<D>(row, col));
      *reinterpret_cast<uint4*>(element<T>(source.dv, b, at.row, h) + col) =
          *reinterpret_cast<const uint4*>(dv_tile + swizzled_offset<D>(row, col));
    }
  }
}

}  // namespace backward
}  // namespace mplug
