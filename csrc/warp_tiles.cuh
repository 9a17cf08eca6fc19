// Warp-level tile products of the backward kernels (mma.sync m16n8k16 on swizzled shared-memory
// tiles read by ldmatrix), and the staging of a warp's accumulator back into such a tile.
#pragma once

#include "mma.cuh"

namespace mplug {
namespace backward {

// acc [16, NT * 8] = A B^T of rows a_row0.. (16) of swizzled [rows, D] tile `a` and rows 0.. (NT * 8)
// of swizzled tile `b`: both operands read by ldmatrix, the product over all D columns.
template <typename T, int D, int NT>
__device__ __forceinline__ void warp_rows_product(float (&acc)[NT][4], const unsigned char* a, int a_row0,
                                                  const unsigned char* b) {
  static_assert(NT % 2 == 0, "B rows are read 16 at a time");
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  }
#pragma unroll
  for (int ks = 0; ks < D / kMmaK; ++ks) {
    uint32_t a_frag[4];
    ldmatrix<4>(a_frag, a + swizzled_offset<D>(a_row0 + x4_row(lane), ks * kMmaK + x4_col(lane)));
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t rows[4];
      ldmatrix<4>(rows, b + swizzled_offset<D>(np * 16 + x4_row(lane), ks * kMmaK + x4_col(lane)));
      const uint32_t first[2] = {rows[0], rows[2]};
      const uint32_t second[2] = {rows[1], rows[3]};
      mma_m16n8k16<T>(acc[2 * np], a_frag, first);
      mma_m16n8k16<T>(acc[2 * np + 1], a_frag, second);
    }
  }
}

// acc [16, NT * 8] += A B: A [16, KS * 16] in registers (one A fragment per k-step), B the rows
// b_row0.. (KS * 16) and columns col0.. (NT * 8) of a swizzled [rows, D] tile, read by ldmatrix.trans.
template <typename T, int D, int NT, int KS>
__device__ __forceinline__ void warp_accumulate(float (&acc)[NT][4], const uint32_t (&a)[KS][4],
                                                const unsigned char* b, int b_row0, int col0) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) {
    const int row = b_row0 + ks * kMmaK + x4_row(lane);
#pragma unroll
    for (int np = 0; np < NT / 2; ++np) {
      uint32_t cols[4];
      ldmatrix_trans<4>(cols, b + swizzled_offset<D>(row, col0 + np * 16 + x4_col(lane)));
      const uint32_t first[2] = {cols[0], cols[1]};
      const uint32_t second[2] = {cols[2], cols[3]};
      mma_m16n8k16<T>(acc[2 * np], a[ks], first);
      mma_m16n8k16<T>(acc[2 * np + 1], a[ks], second);
    }
    if constexpr (NT % 2 == 1) {
      uint32_t last[2];
      ldmatrix_trans<2>(last, b + swizzled_offset<D>(row, col0 + (NT - 1) * kMmaN));
      mma_m16n8k16<T>(acc[NT - 1], a[ks], last);
    }
  }
}

// The A fragments (one per 16 columns) of a [16, NT * 8] accumulator rounded to T.
template <typename T, int NT>
__device__ __forceinline__ void to_a_fragments(uint32_t (&a)[NT / 2][4], const float (&acc)[NT][4]) {
#pragma unroll
  for (int ks = 0; ks < NT / 2; ++ks) {
    pack_a_fragment<T>(a[ks], acc[2 * ks], acc[2 * ks + 1]);
  }
}

template <int NT>
__device__ __forceinline__ void zero_accumulators(float (&acc)[NT][4]) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[nt][i] = 0.0f;
  }
}

// Writes a warp's [16, NT * 8] accumulator times `factor`, rounded to T, into rows row0.. and
// columns col0.. of a swizzled [rows, D] tile.
template <typename T, int D, int NT>
__device__ __forceinline__ void stage_accumulator(unsigned char* tile, int row0, int col0, const float (&acc)[NT][4],
                                                  float factor) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = row0 + acc_row(lane, 2 * half);
      const int col = col0 + nt * kMmaN + acc_col(lane, 0);
      *reinterpret_cast<uint32_t*>(tile + swizzled_offset<D>(row, col)) =
          pack_b16x2<T>(acc[nt][2 * half] * factor, acc[nt][2 * half + 1] * factor);
    }
  }
}

}  // namespace backward
}  // namespace mplug
