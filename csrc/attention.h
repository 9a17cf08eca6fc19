// Host interface of the mplug_kernels CUDA attention kernels: plain structs, raw pointers and strides.
// No PyTorch and no CUDA headers here, so the pybind11 binding compiles with the host compiler alone.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "host_device.h"

namespace mplug {

constexpr int kMaxSources = 4;
constexpr int kMaxSplits = 64;
constexpr int kQueryRowsPerBlock = 32;
constexpr int kKeysPerTile = 64;
constexpr int kThreadsPerBlock = 128;

// The head dims with compiled kernels.
using SupportedHeadDims = std::integer_sequence<int, 32, 64, 80, 96, 128>;

enum class ElementType { float16, bfloat16 };

// One [B, S, H, D] tensor: base pointer and element strides of B, S and H (the D stride is 1).
struct TensorView {
  void* data = nullptr;
  int64_t stride_b = 0;
  int64_t stride_s = 0;
  int64_t stride_h = 0;
};

// One key/value source: keys, values, an optional uint8 key padding mask [B, length], the
// gradients of keys and values (backward only) and optional int32 key positions [B, length] (none:
// every key of the source is visible to every query).
struct SourceView {
  TensorView k;
  TensorView v;
  const uint8_t* mask = nullptr;
  int64_t mask_stride_b = 0;
  int64_t length = 0;
  TensorView dk;
  TensorView dv;
  const int32_t* positions = nullptr;
  int64_t positions_stride_b = 0;
};

// Everything one forward or backward call needs. Pointers not used by a call stay null.
struct AttentionArgs {
  ElementType dtype = ElementType::float16;
  int64_t batch = 0;
  int64_t heads = 0;
  int64_t kv_heads = 0;        // K/V heads [B, S, kv_heads, D], dividing heads; 0: as many as heads
  int64_t q_len = 0;
  int64_t head_dim = 0;
  float scale = 1.0f;
  TensorView q;
  TensorView out;
  float* lse = nullptr;        // [B, H, Lq] natural log
  // positional visibility: key j of source s is visible to query m iff sources[s].positions[b, j] <=
  // query_positions[b, m] (and its mask keeps it); null: no positions, every key's mask alone decides
  const int32_t* query_positions = nullptr;  // int32 [B, Lq], unit stride along Lq
  int64_t query_positions_stride_b = 0;
  int num_sources = 0;
  SourceView sources[kMaxSources];
  // forward split-KV: partial outputs [splits, B*H, Lq, D] and their lse [splits, B*H, Lq]
  int num_splits = 1;
  int64_t split_size = 0;
  float* part_out = nullptr;
  float* part_lse = nullptr;
  // backward
  TensorView dout;
  TensorView dq;               // written directly by the deterministic dQ kernel
  float* dq_accum = nullptr;   // float32 [B, Lq, H, D] contiguous, zeroed: atomic dQ when set
  const float* dlse = nullptr; // [B, H, Lq] contiguous, optional
  float* delta = nullptr;      // workspace [B, H, Lq]
  void* stream = nullptr;      // cudaStream_t
  // forward with masks, without positions: int64 [B, ceil(keys / 64)] workspace, word [b, t] holding bit n where
  // key 64 t + n of the concatenated sources exists and its mask keeps it (filled by the forward before use)
  uint64_t* key_tile_words = nullptr;

  // Query heads per K/V head: query head h reads K/V head h / kv_group(); dK/dV of a K/V head sum its group.
  MPLUG_HD int64_t kv_group() const { return kv_heads > 0 ? heads / kv_heads : 1; }
  MPLUG_HD int64_t kv_head_count() const { return heads / kv_group(); }
  MPLUG_HD bool positional() const { return query_positions != nullptr; }
};

// Split-KV key ranges come from mplug_kernels.occupancy (split_plan, split_keys): split i holds keys
// [i * split_size, (i + 1) * split_size), the last split every key left.

// Warps per forward CTA, 16 query rows each (32 with forward_row_blocks 2; a warp past the queries only
// loads K/V): 2 for up to 32 queries (25 queries: the MMAs cover 32 rows, 1.3x), 4 for longer query sequences and for
// D = 128 (whose two-stage K/V tiles leave room for 3 CTAs per SM: 4 warps keep 12 warps per SM).
constexpr int forward_warps(int64_t head_dim, int64_t q_len) { return q_len <= 32 && head_dim <= 96 ? 2 : 4; }

// m16 row blocks per warp of forward_kernel: 2 (32 rows per warp, 128-row CTAs: every K/V fragment read
// from shared memory feeds twice the MMAs, K/V read ceil(Lq / 128) times per (b, h)) from
// kForwardTallQueries queries on where D <= kForwardTallMaxHeadDim keeps the doubled output and score registers
// without spills (from D = 64 on the warp's Q is read from shared memory each tile; nvcc 13.0: 242 / 254
// registers at D = 64 / 80 on sm_90, D = 96 spills 16 bytes); else 1. positional_forward_kernel keeps 1.
constexpr int64_t kForwardTallQueries = 128;
constexpr int64_t kForwardTallMaxHeadDim = 80;
constexpr int forward_row_blocks(int64_t head_dim, int64_t q_len) {
  return q_len >= kForwardTallQueries && head_dim <= kForwardTallMaxHeadDim ? 2 : 1;
}

// The minimum CTAs per SM that forward_kernel's __launch_bounds__ asks of ptxas (0: none, ptxas' own register
// choice): at D = 96, 8 warps per SM (a budget of 255 registers; ptxas' own choice, 168 on sm_80, spilled 4 bytes).
constexpr int forward_min_ctas_per_sm(int head_dim, int warps) { return head_dim == 96 ? 8 / warps : 0; }

// Query rows of one forward CTA (of positional_forward_kernel when `positional`).
inline int64_t forward_rows_per_cta(int64_t head_dim, int64_t q_len, bool positional = false) {
  return 16 * forward_warps(head_dim, q_len) * (positional ? 1 : forward_row_blocks(head_dim, q_len));
}

// CTAs of the forward kernel for (dtype, head_dim, q_len) resident on one multiprocessor of the
// current device (registers, shared memory, threads); the emulator models an H100's limits.
int forward_ctas_per_sm(ElementType dtype, int64_t head_dim, int64_t q_len);

void attention_forward(const AttentionArgs& args);
void attention_backward(const AttentionArgs& args);

std::vector<int> supported_head_dims();
std::vector<std::string> kernel_names();

}  // namespace mplug
