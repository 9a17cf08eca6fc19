// Argument checks, dtype dispatch and the split-KV plan; host code only.
#include <algorithm>
#include <stdexcept>

#include "attention.h"
#include "key_tiles.h"
#include "launchers.h"

namespace mplug {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument(message);
}

void check_common(const AttentionArgs& args) {
  require(args.batch >= 0 && args.heads > 0 && args.q_len >= 0, "batch, heads and q_len must be >= 0 (heads > 0)");
  require(args.kv_heads >= 0 && (args.kv_heads == 0 || args.heads % args.kv_heads == 0),
          "kv_heads (" + std::to_string(args.kv_heads) + ") must divide heads (" + std::to_string(args.heads) + ")");
  require(args.num_sources >= 1 && args.num_sources <= kMaxSources,
          "num_sources must be in 1.." + std::to_string(kMaxSources) + ", got " + std::to_string(args.num_sources));
  require(args.batch * args.heads <= kMaxGridX, "batch * heads exceeds the CUDA grid limit");
  require(ceil_div(args.q_len, kQueryRowsPerBlock) <= kMaxGridYZ, "q_len exceeds the CUDA grid limit");
  for (int s = 0; s < args.num_sources; ++s) require(args.sources[s].length >= 0, "source lengths must be >= 0");
  bool key_positions = false;
  for (int s = 0; s < args.num_sources; ++s) key_positions = key_positions || args.sources[s].positions != nullptr;
  require(key_positions == args.positional(), "key positions and query positions must be given together");
}

}  // namespace

void attention_forward(const AttentionArgs& args) {
  check_common(args);
  require(args.num_splits >= 1 && args.num_splits <= kMaxSplits, "num_splits must be in 1..64");
  require(args.split_size > 0 && args.split_size % kKeysPerTile == 0, "split_size must be a positive multiple of 64");
  require(args.num_splits == 1 || (args.part_out != nullptr && args.part_lse != nullptr),
          "split-KV needs part_out and part_lse buffers");
  int64_t total_keys = 0;
  bool masked = false;
  for (int s = 0; s < args.num_sources; ++s) {
    total_keys += args.sources[s].length;
    masked = masked || args.sources[s].mask != nullptr;
  }
  require(!masked || args.positional() || args.key_tile_words != nullptr,
          "a masked forward needs key_tile_words (int64 [B, ceil(keys / 64)])");
  require(args.num_splits == 1 || (args.num_splits - 1) * args.split_size < total_keys,
          "num_splits * split_size leaves the last split without keys");
  require(args.batch * args.heads * ceil_div(args.q_len, forward_rows_per_cta(args.head_dim, args.q_len, args.positional())) <=
              kMaxGridX,
          "batch * heads * query tiles exceeds the CUDA grid limit");
  if (args.batch * args.heads * args.q_len == 0) return;
  if (args.dtype == ElementType::float16) {
    forward_float16(args);
  } else {
    forward_bfloat16(args);
  }
}

int forward_ctas_per_sm(ElementType dtype, int64_t head_dim, int64_t q_len) {
  require(q_len >= 1, "q_len must be >= 1, got " + std::to_string(q_len));
  return dtype == ElementType::float16 ? forward_ctas_per_sm_float16(head_dim, q_len)
                                       : forward_ctas_per_sm_bfloat16(head_dim, q_len);
}

void attention_backward(const AttentionArgs& args) {
  check_common(args);
  const int64_t key_tiles = ConcatKeys::of(args).tile_count();  // tiles of the concatenated keys
  if (args.batch * args.heads == 0) return;
  require(args.batch * args.heads * std::max(key_tiles, args.q_len) <= kMaxGridX,
          "batch * heads * max(key tiles, q_len) exceeds the CUDA grid limit");
  require(args.q_len == 0 || args.delta != nullptr, "backward needs a delta workspace");
  if (args.dtype == ElementType::float16) {
    backward_float16(args);
  } else {
    backward_bfloat16(args);
  }
}

namespace {

template <int... Ds>
std::vector<int> head_dims_of(std::integer_sequence<int, Ds...>) {
  return {Ds...};
}

}  // namespace

std::vector<int> supported_head_dims() { return head_dims_of(SupportedHeadDims{}); }

std::vector<std::string> kernel_names() {
  std::vector<std::string> names;
  for (const char* dtype : {"float16", "bfloat16"}) {
    for (int head_dim : supported_head_dims()) {
      for (const char* kernel : {"forward", "dkdv", "dq"}) {
        names.push_back(std::string(kernel) + "<" + dtype + ", " + std::to_string(head_dim) + ">");
      }
    }
    for (const char* kernel : {"combine", "delta"}) names.push_back(std::string(kernel) + "<" + dtype + ">");
  }
  return names;
}

}  // namespace mplug
