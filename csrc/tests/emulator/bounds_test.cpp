// The emulated kernels on exactly sized heap buffers, for valgrind's memcheck: every read and write
// of the forward (with and without split-KV) and of the backward (atomic and deterministic dQ)
// stays inside its tensor, and every output element is written (outputs start uninitialised and
// are read back through a branch). Odd sizes, 1-3 sources, masks and a packed K/V layout.
// Link with the kernel objects built by tests/cuda_emulator.py; run under `valgrind --error-exitcode=1`.
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "attention.h"

namespace {

using mplug::AttentionArgs;
using mplug::ElementType;
using mplug::TensorView;

std::mt19937 random_bits(7);

struct Case {
  int64_t batch, heads, q_len, head_dim;
  std::vector<int64_t> lengths;
  bool masked;
  int forced_splits;
  bool packed_kv;  // K and V as interleaved views of one [B, L, 2, H, D] buffer
};

// An uninitialised heap array of exactly `count` elements (valgrind tracks both its bounds and definedness).
template <typename T>
std::unique_ptr<T[]> uninitialised(int64_t count) {
  return std::unique_ptr<T[]>(new T[count]);
}

std::unique_ptr<uint16_t[]> random_halves(int64_t count) {
  std::normal_distribution<float> normal;
  auto values = uninitialised<uint16_t>(count);
  for (int64_t i = 0; i < count; ++i) {
    const _Float16 x = static_cast<_Float16>(normal(random_bits));
    std::memcpy(&values[i], &x, sizeof(x));
  }
  return values;
}

std::unique_ptr<float[]> random_floats(int64_t count) {
  std::normal_distribution<float> normal;
  auto values = uninitialised<float>(count);
  for (int64_t i = 0; i < count; ++i) values[i] = normal(random_bits);
  return values;
}

// Reads every element through a branch, so memcheck reports any that was never written.
int count_nan_halves(const uint16_t* values, int64_t count) {
  int nans = 0;
  for (int64_t i = 0; i < count; ++i) {
    _Float16 x;
    std::memcpy(&x, &values[i], sizeof(x));
    if (std::isnan(static_cast<float>(x))) ++nans;
  }
  return nans;
}

int count_nan_floats(const float* values, int64_t count) {
  int nans = 0;
  for (int64_t i = 0; i < count; ++i) {
    if (std::isnan(values[i])) ++nans;
  }
  return nans;
}

TensorView contiguous_view(void* data, const Case& c, int64_t length) {
  return TensorView{data, length * c.heads * c.head_dim, c.heads * c.head_dim, c.head_dim};
}

// Runs forward and both backward paths of one case; returns the number of NaN outputs.
int run_case(const Case& c) {
  const int64_t B = c.batch, H = c.heads, Lq = c.q_len, D = c.head_dim;
  const int64_t q_elements = B * Lq * H * D, rows = B * H * Lq;
  AttentionArgs args;
  args.dtype = ElementType::float16;
  args.batch = B;
  args.heads = H;
  args.q_len = Lq;
  args.head_dim = D;
  args.scale = 1.0f / std::sqrt(static_cast<float>(D));
  auto q = random_halves(q_elements);
  auto out = uninitialised<uint16_t>(q_elements);
  auto lse = uninitialised<float>(rows);
  args.q = contiguous_view(q.get(), c, Lq);
  args.out = contiguous_view(out.get(), c, Lq);
  args.lse = lse.get();
  args.num_sources = static_cast<int>(c.lengths.size());
  std::vector<std::unique_ptr<uint16_t[]>> keys, values, dks, dvs;
  std::vector<std::unique_ptr<uint8_t[]>> masks;
  int64_t total_keys = 0;
  for (size_t s = 0; s < c.lengths.size(); ++s) {
    const int64_t L = c.lengths[s];
    total_keys += L;
    mplug::SourceView& source = args.sources[s];
    source.length = L;
    if (c.packed_kv) {
      keys.push_back(random_halves(B * L * 2 * H * D));
      source.k = TensorView{keys.back().get(), L * 2 * H * D, 2 * H * D, D};
      source.v = TensorView{keys.back().get() + H * D, L * 2 * H * D, 2 * H * D, D};
    } else {
      keys.push_back(random_halves(B * L * H * D));
      values.push_back(random_halves(B * L * H * D));
      source.k = contiguous_view(keys.back().get(), c, L);
      source.v = contiguous_view(values.back().get(), c, L);
    }
    if (c.masked) {
      masks.push_back(uninitialised<uint8_t>(B * L));
      for (int64_t i = 0; i < B * L; ++i) masks.back()[i] = (i % L) % 3 != 1 && (i / L) != 0;  // batch 0 fully masked
      source.mask = masks.back().get();
      source.mask_stride_b = L;
    }
    dks.push_back(uninitialised<uint16_t>(B * L * H * D));
    dvs.push_back(uninitialised<uint16_t>(B * L * H * D));
    source.dk = contiguous_view(dks.back().get(), c, L);
    source.dv = contiguous_view(dvs.back().get(), c, L);
  }
  // mplug_kernels.occupancy.split_keys: whole key tiles per split, a last split under one tile merged
  const int64_t wanted = c.forced_splits > 0 ? c.forced_splits : 1;
  const int64_t key_count = total_keys > 0 ? total_keys : 1;
  args.split_size = ((key_count + wanted - 1) / wanted + mplug::kKeysPerTile - 1) / mplug::kKeysPerTile * mplug::kKeysPerTile;
  args.num_splits = static_cast<int>((key_count + args.split_size - 1) / args.split_size);
  if (args.num_splits > 1 && key_count - (args.num_splits - 1) * args.split_size < mplug::kKeysPerTile) --args.num_splits;
  auto part_out = uninitialised<float>(args.num_splits * rows * D);
  auto part_lse = uninitialised<float>(args.num_splits * rows);
  if (args.num_splits > 1) {
    args.part_out = part_out.get();
    args.part_lse = part_lse.get();
  }
  // the masks' key tile words, exactly [B, ceil(keys / 64)]
  auto key_tile_words = uninitialised<uint64_t>(B * ((total_keys + mplug::kKeysPerTile - 1) / mplug::kKeysPerTile));
  if (c.masked) args.key_tile_words = key_tile_words.get();
  mplug::attention_forward(args);
  int nans = count_nan_halves(out.get(), q_elements) + count_nan_floats(lse.get(), rows);

  auto dout = random_halves(q_elements);
  auto dlse = random_floats(rows);
  auto delta = uninitialised<float>(rows);
  args.dout = contiguous_view(dout.get(), c, Lq);
  args.dlse = dlse.get();
  args.delta = delta.get();
  for (bool deterministic : {false, true}) {
    auto dq = uninitialised<uint16_t>(q_elements);
    auto dq_accum = uninitialised<float>(q_elements);
    std::fill(dq_accum.get(), dq_accum.get() + q_elements, 0.0f);
    args.dq = deterministic ? contiguous_view(dq.get(), c, Lq) : TensorView{};
    args.dq_accum = deterministic ? nullptr : dq_accum.get();
    mplug::attention_backward(args);
    nans += deterministic ? count_nan_halves(dq.get(), q_elements) : count_nan_floats(dq_accum.get(), q_elements);
    for (size_t s = 0; s < c.lengths.size(); ++s) {
      const int64_t elements = B * c.lengths[s] * H * D;
      nans += count_nan_halves(dks[s].get(), elements) + count_nan_halves(dvs[s].get(), elements);
    }
  }
  return nans;
}

}  // namespace

int main() {
  const std::vector<Case> cases = {
      {2, 2, 7, 64, {197}, true, 0, false},
      {1, 3, 33, 32, {25, 7, 1}, true, 0, true},
      {2, 1, 1, 128, {577}, false, 9, false},  // 9 splits, the last one 65 keys (a 1-key sliver merged)
      {1, 2, 40, 80, {70, 64}, true, 3, true},  // 2 splits: 64 keys, then 70
      {1, 1, 5, 96, {1}, false, 0, false},
      {1, 1, 131, 32, {200}, true, 2, false},  // 128-row CTAs (D = 32; the second holds 3 rows), 2 splits
      {1, 2, 130, 32, {70, 9}, true, 0, true},  // 128-row CTAs writing T output and lse
      {1, 1, 129, 64, {90}, true, 0, false},  // 128-row CTAs with Q staged in shared memory (D = 64)
  };
  int nans = 0;
  for (const Case& c : cases) nans += run_case(c);
  std::printf("%s: %d NaN output(s) over %zu cases\n", nans ? "FAILED" : "ok", nans, cases.size());
  return nans ? 1 : 0;
}
