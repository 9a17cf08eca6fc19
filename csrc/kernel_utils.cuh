// Device building blocks: element conversion, warp reductions, shared-memory layout, 16-byte
// asynchronous tile loads, key-tile enumeration over several sources and tensor-core block GEMMs.
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
constexpr int kBlockM = kQueryRowsPerBlock;
constexpr int kBlockN = kKeysPerTile;
constexpr int kRowsPerWarp = kBlockM / kWarps;
constexpr int kFrag = 16;                 // wmma tile edge
constexpr int kChunk = 8;                 // 16-bit elements per 16-byte load
constexpr int kScoreLd = kBlockN + 4;     // floats per row of a [kBlockM, kBlockN] score tile
constexpr int kProbLd = kBlockN + 8;      // elements per row of a [kBlockM, kBlockN] probability tile

// Leading dimensions (elements) of [rows, D] tiles: 16-bit inputs and float accumulators.
template <int D>
struct HeadTile {
  static constexpr int kLd = D + 8;
  static constexpr int kAccLd = D + 4;
  static_assert(D % kFrag == 0, "head dim must be a multiple of 16");
};

__host__ __device__ constexpr size_t align128(size_t bytes) { return (bytes + 127) / 128 * 128; }

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

// Starts 16-byte asynchronous copies of rows [0, valid) of a [ROWS, D] slab into shared memory
// (leading dim D + 8) and zero-fills rows [valid, ROWS). Completes at __pipeline_wait_prior.
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_rows_async(T* tile, const T* rows, int64_t row_stride, int64_t valid) {
  constexpr int kChunksPerRow = D / kChunk;
  for (int i = threadIdx.x; i < ROWS * kChunksPerRow; i += kThreads) {
    const int row = i / kChunksPerRow;
    const int col = (i % kChunksPerRow) * kChunk;
    T* destination = tile + row * HeadTile<D>::kLd + col;
    if (row < valid) {
      __pipeline_memcpy_async(destination, rows + row * row_stride + col, 16);
    } else {
      *reinterpret_cast<uint4*>(destination) = make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

// Sets a float [rows, ld] shared-memory tile to zero.
__device__ __forceinline__ void zero_floats(float* tile, int count) {
  for (int i = threadIdx.x; i < count; i += kThreads) tile[i] = 0.0f;
}

// Whether key `start + n` of a tile is visible: inside the tile and not padded.
__device__ __forceinline__ bool key_visible(const SourceView& source, const KeyTile& tile, int64_t b, int n) {
  const int64_t key = tile.start + n;
  if (key >= tile.end) return false;
  return source.mask == nullptr || source.mask[b * source.mask_stride_b + key] != 0;
}

template <typename Layout>
__device__ __forceinline__ int tile_offset(int row, int col, int ld);
template <>
__device__ __forceinline__ int tile_offset<nvcuda::wmma::row_major>(int row, int col, int ld) { return row * ld + col; }
template <>
__device__ __forceinline__ int tile_offset<nvcuda::wmma::col_major>(int row, int col, int ld) { return col * ld + row; }

// C (float, row-major, [MF*16, NF*16]) = (C if accumulate) + A [MF*16, KS*16] * B [KS*16, NF*16],
// A and B in shared memory with the given wmma layouts; the block's warps share the 16x16 tiles.
template <typename T, typename LayoutA, typename LayoutB, int MF, int NF, int KS>
__device__ __forceinline__ void block_gemm(const T* a, int lda, const T* b, int ldb, float* c, int ldc, bool accumulate) {
  using namespace nvcuda;
  const int warp = threadIdx.x / 32;
  for (int f = warp; f < MF * NF; f += kWarps) {
    const int mi = f % MF;
    const int ni = f / MF;
    float* c_tile = c + mi * kFrag * ldc + ni * kFrag;
    wmma::fragment<wmma::accumulator, kFrag, kFrag, kFrag, float> acc;
    if (accumulate) {
      wmma::load_matrix_sync(acc, c_tile, ldc, wmma::mem_row_major);
    } else {
      wmma::fill_fragment(acc, 0.0f);
    }
#pragma unroll
    for (int k = 0; k < KS; ++k) {
      wmma::fragment<wmma::matrix_a, kFrag, kFrag, kFrag, T, LayoutA> a_frag;
      wmma::fragment<wmma::matrix_b, kFrag, kFrag, kFrag, T, LayoutB> b_frag;
      wmma::load_matrix_sync(a_frag, a + tile_offset<LayoutA>(mi * kFrag, k * kFrag, lda), lda);
      wmma::load_matrix_sync(b_frag, b + tile_offset<LayoutB>(k * kFrag, ni * kFrag, ldb), ldb);
      wmma::mma_sync(acc, a_frag, b_frag, acc);
    }
    wmma::store_matrix_sync(c_tile, acc, ldc, wmma::mem_row_major);
  }
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
