// The forward's per-call summary of the key padding masks: one 64-bit word per batch row and tile of 64
// concatenated keys (AttentionArgs::key_tile_words), so that the forward reads one word per key tile,
// a tile ahead, instead of finding each key's source and mask byte in its key loop.
#pragma once

#include "forward_loads.cuh"

namespace mplug {

constexpr int kKeyTileWordThreads = 128;

// Bit n of batch row b's word for the keys [k0, k0 + kBlockN): key k0 + n exists and its mask keeps it.
__device__ __forceinline__ uint64_t key_tile_word(const AttentionArgs& args, const ConcatKeys& keys, int64_t b,
                                                  int64_t k0) {
  uint64_t word = 0;
  for (int n = 0; n < kBlockN && k0 + n < keys.total; ++n) {
    const int64_t key = k0 + n;
    const int s = keys.source_of(key);
    const uint8_t* mask = args.sources[s].mask;
    const bool kept = mask == nullptr || mask[b * args.sources[s].mask_stride_b + (key - keys.start(s))] != 0;
    word |= static_cast<uint64_t>(kept) << n;
  }
  return word;
}

// One thread per word of key_tile_words [B, key tiles]; static: each forward unit has its copy.
static __global__ void __launch_bounds__(kKeyTileWordThreads)
    key_tile_words_kernel(const __grid_constant__ AttentionArgs args) {
  const ConcatKeys keys = ConcatKeys::of(args);
  const int64_t tiles = keys.tile_count();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kKeyTileWordThreads + threadIdx.x;
  if (i >= args.batch * tiles) return;
  args.key_tile_words[i] = key_tile_word(args, keys, i / tiles, i % tiles * kBlockN);
}

// Fills args.key_tile_words (where the forward has one: a source has a mask).
static void launch_key_tile_words(const AttentionArgs& args) {
  if (args.key_tile_words == nullptr) return;
  const int64_t words = args.batch * ConcatKeys::of(args).tile_count();
  if (words == 0) return;
  launch(key_tile_words_kernel, "key_tile_words_kernel",
         dim3(static_cast<unsigned>((words + kKeyTileWordThreads - 1) / kKeyTileWordThreads)), kKeyTileWordThreads, 0,
         args);
}

}  // namespace mplug
