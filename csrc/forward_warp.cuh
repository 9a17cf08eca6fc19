// The forward's per-warp math, FlashAttention-2 style: each warp owns kRowBlocks m16 blocks of query rows
// (16 or 32 rows) whose scores, probabilities, output accumulators and softmax statistics stay in registers,
// and its Q fragments in registers (RegisterQueries) or shared memory (SharedQueries). Every K and V fragment
// read from shared memory (ldmatrix) feeds the MMAs of all row blocks. Arrays hold the row blocks one after
// another: block i's Q fragments are q[i * D / 16 ...], its accumulators o[i * D / 8 ...], its scores
// s[i * kBlockN / 8 ...] and its two rows' softmax rows[2 * i ...].
#pragma once

#include "forward_loads.cuh"

namespace mplug {

// The registers of one warp: the output accumulators and the running softmax of rows g and g + 8 of each
// row block for this lane (g = lane / 4).
template <int D, int kRowBlocks = 1>
struct WarpState {
  float o[kRowBlocks * D / 8][4];
  RunningSoftmax rows[2 * kRowBlocks];
};

// The A fragments of a warp's kRowBlocks * 16 query rows, held in registers (loaded once by load_queries).
template <int D, int kRowBlocks = 1>
struct RegisterQueries {
  uint32_t q[kRowBlocks * D / 16][4];
  __device__ __forceinline__ void fragment(int block, int ks, uint32_t (&a)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = q[block * D / 16 + ks][i];
  }
};

// The A fragments of a warp's 32 query rows, read by ldmatrix from its swizzled [32, D] rows in shared memory
// (stage_queries) each tile: registers for the second row block's scores and accumulators, not for its Q.
template <int D>
struct SharedQueries {
  const unsigned char* rows;
  __device__ __forceinline__ void fragment(int block, int ks, uint32_t (&a)[4]) const {
    const int lane = threadIdx.x % 32;
    ldmatrix<4>(a, rows + swizzled_offset<D>(16 * block + x4_row(lane), 16 * ks + x4_col(lane)));
  }
};

// Loads the A fragments of query rows [row0, row0 + 16 * kRowBlocks) straight from global memory (rows past
// q_len read as zeros); each lane takes its 32-bit pairs. `sign` (0x80008000 or 0) negates Q exactly, so that a
// negative softmax scale becomes a positive one.
template <typename T, int D, int kRowBlocks = 1>
__device__ __forceinline__ void load_queries(const AttentionArgs& args, int64_t b, int64_t h, int64_t row0,
                                             uint32_t sign, RegisterQueries<D, kRowBlocks>& queries) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int block = 0; block < kRowBlocks; ++block) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t row = row0 + 16 * block + lane_quad(lane) + 8 * (i % 2);
      const T* q_row = element<const T>(args.q, b, row < args.q_len ? row : 0, h);
#pragma unroll
      for (int ks = 0; ks < D / 16; ++ks) {
        const int col = 16 * ks + 2 * lane_in_quad(lane) + 8 * (i / 2);
        queries.q[block * D / 16 + ks][i] =
            row < args.q_len ? *reinterpret_cast<const uint32_t*>(q_row + col) ^ sign : 0u;
      }
    }
  }
}

// Copies query rows [row0, row0 + 32) into the warp's swizzled [32, D] `rows` in shared memory (rows past q_len
// as zeros, every element XORed with `sign` as in load_queries), by 16-byte chunks; the warp reads them after
// this __syncwarp.
template <typename T, int D>
__device__ __forceinline__ void stage_queries(const AttentionArgs& args, int64_t b, int64_t h, int64_t row0,
                                              uint32_t sign, unsigned char* rows) {
  constexpr int kChunks = D / 8;
  for (int i = threadIdx.x % 32; i < 2 * kForwardWarpRows * kChunks; i += 32) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    uint4 chunk = make_uint4(0u, 0u, 0u, 0u);
    if (row0 + row < args.q_len) {
      chunk = *reinterpret_cast<const uint4*>(element<const T>(args.q, b, row0 + row, h) + col);
      chunk = make_uint4(chunk.x ^ sign, chunk.y ^ sign, chunk.z ^ sign, chunk.w ^ sign);
    }
    *reinterpret_cast<uint4*>(rows + swizzled_offset<D>(row, col)) = chunk;
  }
  __syncwarp();
}

// S = Q K^T for the warp's rows and the tile's 64 keys: s[j] holds keys 8j .. 8j + 7 of row block 0,
// s[kBlockN / 8 + j] those of row block 1. Each K fragment is read once for every row block.
template <typename T, int D, int kRowBlocks = 1, typename Queries>
__device__ __forceinline__ void tile_scores(const Queries& queries, const unsigned char* keys,
                                            float (&s)[kRowBlocks * kBlockN / 8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < kRowBlocks * kBlockN / 8; ++j) {
#pragma unroll
    for (int i = 0; i < 4; ++i) s[j][i] = 0.0f;
  }
#pragma unroll
  for (int ks = 0; ks < D / 16; ++ks) {
    uint32_t q[kRowBlocks][4];
#pragma unroll
    for (int block = 0; block < kRowBlocks; ++block) queries.fragment(block, ks, q[block]);
#pragma unroll
    for (int n16 = 0; n16 < kBlockN / 16; ++n16) {
      uint32_t k[4];
      ldmatrix<4>(k, keys + swizzled_offset<D>(16 * n16 + x4_row_b(lane), 16 * ks + x4_col_b(lane)));
#pragma unroll
      for (int block = 0; block < kRowBlocks; ++block) {
        const int j = block * kBlockN / 8 + 2 * n16;
        mma_m16n8k16<T>(s[j], q[block], {k[0], k[1]});
        mma_m16n8k16<T>(s[j + 1], q[block], {k[2], k[3]});
      }
    }
  }
}

// Folds the tile's scores into the running softmax of rows g and g + 8 of every row block (maxima
// reduced within the lane's quad by two shuffles), rescales the output accumulators and turns s into
// probabilities. Scores are unscaled, scale_log2 >= 0; row sums stay per lane until the end.
template <int D, int kRowBlocks = 1>
__device__ __forceinline__ void online_softmax(float (&s)[kRowBlocks * kBlockN / 8][4], float scale_log2,
                                               WarpState<D, kRowBlocks>& warp) {
#pragma unroll
  for (int block = 0; block < kRowBlocks; ++block) {
    float(*scores)[4] = s + block * kBlockN / 8;
    float(*out)[4] = warp.o + block * D / 8;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      RunningSoftmax& row = warp.rows[2 * block + r];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(scores[j][2 * r], scores[j][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
      float shift;
      const float alpha = rescale_for_tile(row, tile_max * scale_log2, &shift);
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          scores[j][2 * r + c] = exp2_approx(fmaf(scores[j][2 * r + c], scale_log2, -shift));
          sum += scores[j][2 * r + c];
        }
      }
      row.sum += sum;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        out[n][2 * r] *= alpha;
        out[n][2 * r + 1] *= alpha;
      }
    }
  }
}

// O += P V: the probabilities, packed to T, are the A fragments; V comes by ldmatrix .trans, each
// fragment read once for every row block.
template <typename T, int D, int kRowBlocks = 1>
__device__ __forceinline__ void accumulate_values(const float (&p)[kRowBlocks * kBlockN / 8][4],
                                                  const unsigned char* values, float (&o)[kRowBlocks * D / 8][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int k16 = 0; k16 < kBlockN / 16; ++k16) {
    uint32_t a[kRowBlocks][4];
#pragma unroll
    for (int block = 0; block < kRowBlocks; ++block) {
      const int j = block * kBlockN / 8 + 2 * k16;
      pack_a_fragment<T>(a[block], p[j], p[j + 1]);
    }
#pragma unroll
    for (int d16 = 0; d16 < D / 16; ++d16) {
      uint32_t v[4];
      ldmatrix_trans<4>(v, values + swizzled_offset<D>(16 * k16 + x4_row(lane), 16 * d16 + x4_col(lane)));
#pragma unroll
      for (int block = 0; block < kRowBlocks; ++block) {
        mma_m16n8k16<T>(o[block * D / 8 + 2 * d16], a[block], {v[0], v[1]});
        mma_m16n8k16<T>(o[block * D / 8 + 2 * d16 + 1], a[block], {v[2], v[3]});
      }
    }
  }
}

// Quad-reduces the row sums and writes the warp's rows: normalised T output by 16-byte stores
// (staged through the warp's own `scratch` of 16 * kRowBlocks rows) and lse, or the float partials of a
// split. Lane row r (0 .. 2 * kRowBlocks - 1) is query row row0 + g + 8r: half r % 2 of row block r / 2.
template <typename T, int D, int kRowBlocks = 1>
__device__ __forceinline__ void write_rows(const AttentionArgs& args, int64_t b, int64_t h, int64_t row0,
                                           WarpState<D, kRowBlocks>& warp, unsigned char* scratch) {
  constexpr int kLaneRows = 2 * kRowBlocks;
  const int lane = threadIdx.x % 32;
  const int64_t bh = b * args.heads + h;
  const int64_t split_row0 = (blockIdx.y * args.batch * args.heads + bh) * args.q_len;
  // lane row r's accumulator pair of columns 8n + 2t, 8n + 2t + 1 (t = lane % 4)
  auto accumulator = [&](int r, int n) { return warp.o[r / 2 * D / 8 + n] + 2 * (r % 2); };
  float normalizer[kLaneRows];
#pragma unroll
  for (int r = 0; r < kLaneRows; ++r) {
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
    for (int r = 0; r < kLaneRows; ++r) {
      const int64_t m = row0 + lane_quad(lane) + 8 * r;
      if (m >= args.q_len) continue;
      float* part = args.part_out + (split_row0 + m) * D;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        const float* pair = accumulator(r, n);
        *reinterpret_cast<float2*>(part + 8 * n + 2 * lane_in_quad(lane)) =
            make_float2(pair[0] * normalizer[r], pair[1] * normalizer[r]);
      }
    }
    return;
  }
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
#pragma unroll
    for (int r = 0; r < kLaneRows; ++r) {
      const float* pair = accumulator(r, n);
      const uint32_t packed = pack_b16x2<T>(pair[0] * normalizer[r], pair[1] * normalizer[r]);
      *reinterpret_cast<uint32_t*>(scratch + swizzled_offset<D>(lane_quad(lane) + 8 * r, 8 * n) +
                                   4 * lane_in_quad(lane)) = packed;
    }
  }
  __syncwarp();
  constexpr int kChunks = D / 8;
#pragma unroll
  for (int i = lane; i < kRowBlocks * kForwardWarpRows * kChunks; i += 32) {
    const int row = i / kChunks;
    const int col = i % kChunks * 8;
    if (row0 + row < args.q_len) {
      *reinterpret_cast<uint4*>(element<T>(args.out, b, row0 + row, h) + col) =
          *reinterpret_cast<const uint4*>(scratch + swizzled_offset<D>(row, col));
    }
  }
}

}  // namespace mplug
