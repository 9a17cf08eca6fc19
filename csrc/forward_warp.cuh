// The forward's per-warp math, FlashAttention-2 style: each warp owns 16 query rows whose Q fragments,
// scores, probabilities, output accumulators and softmax statistics stay in registers.
#pragma once

#include "forward_loads.cuh"

namespace mplug {

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

}  // namespace mplug
