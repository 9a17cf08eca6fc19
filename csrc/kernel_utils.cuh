// Device building blocks: element conversion, warp reductions, 64-bit element addressing, key
// visibility and head-dim dispatch.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "attention.h"
// The CUDA toolkit headers and `launch`; the CPU emulator build (csrc/tests/emulator) names its own.
#ifndef MPLUG_PLATFORM_HEADER
#define MPLUG_PLATFORM_HEADER "cuda_platform.cuh"
#endif
#include MPLUG_PLATFORM_HEADER
#include "key_tiles.h"
#include "row_math.h"

// Keeps a rarely taken device function out of line (the emulator build uses the host attribute).
#if defined(__CUDACC__)
#define MPLUG_NOINLINE __noinline__
#else
#define MPLUG_NOINLINE [[gnu::noinline]]
#endif

namespace mplug {

constexpr int kThreads = kThreadsPerBlock;
constexpr int kWarps = kThreads / 32;
constexpr int kBlockN = kKeysPerTile;
constexpr int kChunk = 8;                 // 16-bit elements per 16-byte load

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, offset));
  return x;
}

__device__ __forceinline__ float warp_sum(float x) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
  return x;
}

// Element (b, s, h, 0) of a [B, S, H, D] view, with 64-bit offsets.
template <typename T>
__device__ __forceinline__ T* element(const TensorView& view, int64_t b, int64_t s, int64_t h) {
  return static_cast<T*>(view.data) + b * view.stride_b + s * view.stride_s + h * view.stride_h;
}

// Whether key `start + n` of a tile of the concatenated keys is visible: inside the tile and not padded
// in its own source.
__device__ __forceinline__ bool key_visible(const AttentionArgs& args, const ConcatKeys& keys, const KeyTile& tile,
                                            int64_t b, int n) {
  const int64_t key = tile.start + n;
  if (key >= tile.end) return false;
  const KeyRow at = keys.locate(key);
  const SourceView& source = args.sources[at.source];
  return source.mask == nullptr || source.mask[b * source.mask_stride_b + at.row] != 0;
}

template <int D>
using HeadDim = std::integral_constant<int, D>;

template <int... Ds, typename Body>
bool dispatch_over(std::integer_sequence<int, Ds...>, int64_t head_dim, Body&& body) {
  return ((head_dim == Ds ? (body(HeadDim<Ds>{}), true) : false) || ...);
}

// Calls body(HeadDim<D>{}) for the runtime head dim; throws std::invalid_argument for an unsupported one.
template <typename Body>
void dispatch_head_dim(int64_t head_dim, Body&& body) {
  if (!dispatch_over(SupportedHeadDims{}, head_dim, body)) {
    throw std::invalid_argument("head_dim " + std::to_string(head_dim) + " has no compiled kernel");
  }
}

}  // namespace mplug
