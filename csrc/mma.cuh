// Layout-independent helpers of the register-resident (mma.sync m16n8k16) kernels: which rows and
// columns a lane's fragment registers hold, which row address a lane passes to ldmatrix, the XOR
// swizzle of shared-memory tiles, and packing two floats into one register of 16-bit elements.
// The primitives themselves (mma_m16n8k16, ldmatrix, ldmatrix_trans) belong to the platform
// (cuda_platform.cuh; csrc/tests/emulator/cpu_platform.h emulates them).
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_utils.cuh"

namespace mplug {

constexpr int kMmaM = 16;  // rows of A and C
constexpr int kMmaN = 8;   // columns of B and C
constexpr int kMmaK = 16;  // columns of A, rows of B

// Lane l of a warp is thread t = l % 4 of quad g = l / 4; a quad shares the rows of an accumulator.
// (Bit operations: these indices are never negative, and signed division would cost instructions.)
__device__ __forceinline__ int lane_quad(int lane) { return lane >> 2; }
__device__ __forceinline__ int lane_in_quad(int lane) { return lane & 3; }

// Row and column of accumulator element acc[i] (0..3) in lane `lane`'s 16x8 tile.
__device__ __forceinline__ int acc_row(int lane, int i) { return lane_quad(lane) + 8 * (i / 2); }
__device__ __forceinline__ int acc_col(int lane, int i) { return 2 * lane_in_quad(lane) + i % 2; }

// The row and column (elements) of a row-major 16x16 block whose 16-byte row `lane` passes to
// ldmatrix<4>: matrices 0..3 are the block's quarters (rows 0-7, cols 0-7), (rows 8-15, cols 0-7),
// (rows 0-7, cols 8-15), (rows 8-15, cols 8-15). Loaded plain, these registers are the A fragment
// of the block, or the B fragments {r0, r2} and {r1, r3} of the block's rows 0-7 and 8-15 read as
// columns of B (keys of K^T); loaded with .trans, {r0, r1} and {r2, r3} are the B fragments of the
// block's columns 0-7 and 8-15 (V as B, its rows along k).
__device__ __forceinline__ int x4_row(int lane) { return lane & 15; }
__device__ __forceinline__ int x4_col(int lane) { return (lane >> 4) << 3; }

// As x4_row/x4_col with the quarters in the order (rows 0-7, cols 0-7), (rows 0-7, cols 8-15),
// (rows 8-15, cols 0-7), (rows 8-15, cols 8-15): loaded plain, {r0, r1} and {r2, r3} are the B
// fragments of the block's rows 0-7 and 8-15 read as columns of B (K as B of Q K^T), each an
// adjacent register pair as mma.sync wants it (no moves).
__device__ __forceinline__ int x4_row_b(int lane) { return (lane & 7) | ((lane >> 4) << 3); }
__device__ __forceinline__ int x4_col_b(int lane) { return ((lane >> 3) & 1) << 3; }

// XOR swizzle of [rows, D] tiles of 16-bit elements in shared memory, in 16-byte chunks: the
// chunks of a row form groups of 8 (then one group of 2 or 4 where D / 8 is not a multiple of 8),
// and chunk c of group size G in row r moves to c ^ ((r / (8 / G)) % G) within its group. The
// eight rows an ldmatrix matrix reads (any row block of 8, any column) then land in eight
// different 16-byte bank groups for every supported D, where a plain [rows, D] layout puts
// them in one (D = 64, 128) and a 16-byte cp.async chunk stays whole.
template <int D>
__host__ __device__ __forceinline__ int swizzled_chunk(int row, int chunk) {
  constexpr int kChunks = D / 8;
  constexpr int kFull = kChunks / 8 * 8;
  constexpr int kTail = kChunks - kFull;
  static_assert(kTail == 0 || kTail == 2 || kTail == 4, "D / 8 must leave a tail group of 0, 2 or 4 chunks");
  if constexpr (kTail == 0) {
    return chunk ^ (row & 7);
  } else {
    constexpr int kRowShift = kTail == 4 ? 1 : 2;  // row / (8 / kTail)
    if (chunk < kFull) return chunk ^ (row & 7);
    return kFull + ((chunk - kFull) ^ ((row >> kRowShift) & (kTail - 1)));
  }
}

// Byte offset of element (row, col) in a swizzled [rows, D] tile; the 8 elements from a col that
// is a multiple of 8 are contiguous (one 16-byte chunk).
template <int D>
__host__ __device__ __forceinline__ uint32_t swizzled_offset(int row, int col) {
  return static_cast<uint32_t>(row * D * 2 + swizzled_chunk<D>(row, col >> 3) * 16 + (col & 7) * 2);
}

template <typename T>
struct Pair;
template <>
struct Pair<__half> {
  using type = __half2;
  static __device__ __forceinline__ type of(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};
template <>
struct Pair<__nv_bfloat16> {
  using type = __nv_bfloat162;
  static __device__ __forceinline__ type of(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};

// `lo` and `hi` rounded to T and packed into one register, `lo` in the low 16 bits (the order of
// fragment elements and of memory).
template <typename T>
__device__ __forceinline__ uint32_t pack_b16x2(float lo, float hi) {
  const typename Pair<T>::type pair = Pair<T>::of(lo, hi);
  uint32_t bits;
  static_assert(sizeof(pair) == sizeof(bits), "two 16-bit elements per register");
  std::memcpy(&bits, &pair, sizeof(bits));
  return bits;
}

// The A fragment of 16 columns of a float accumulator: its two 8-column tiles `left` and `right` rounded to T
// (register i: row g + 8 (i % 2), columns 2t + 8 (i / 2) + {0, 1}).
template <typename T>
__device__ __forceinline__ void pack_a_fragment(uint32_t (&a)[4], const float (&left)[4], const float (&right)[4]) {
  a[0] = pack_b16x2<T>(left[0], left[1]);
  a[1] = pack_b16x2<T>(left[2], left[3]);
  a[2] = pack_b16x2<T>(right[0], right[1]);
  a[3] = pack_b16x2<T>(right[2], right[3]);
}

}  // namespace mplug
