// Host test of the kernels' host/device helpers: row_math.h (streaming softmax, split merging and
// lse recomputation agree with a direct double-precision softmax) and key_tiles.h (the 64-key tiles
// of the concatenated sources cover each key exactly once, each located in its own source). Exit
// status 0 on success.
#include <cmath>
#include <cstdio>
#include <random>
#include <utility>
#include <vector>

#include "key_tiles.h"
#include "row_math.h"

namespace {

int failures = 0;

void expect_close(double actual, double expected, double tolerance, const char* what) {
  const bool both_neg_inf = std::isinf(actual) && std::isinf(expected) && actual < 0 && expected < 0;
  if (!both_neg_inf && !(std::fabs(actual - expected) <= tolerance * (1.0 + std::fabs(expected)))) {
    std::printf("FAIL %s: got %.9g, expected %.9g\n", what, actual, expected);
    ++failures;
  }
}

// Direct log-sum-exp (natural log) of the visible scores; -inf when none is visible.
double direct_lse(const std::vector<float>& scores, const std::vector<bool>& visible) {
  double maximum = -INFINITY;
  for (size_t i = 0; i < scores.size(); ++i)
    if (visible[i]) maximum = std::fmax(maximum, static_cast<double>(scores[i]));
  if (std::isinf(maximum)) return -INFINITY;
  double sum = 0.0;
  for (size_t i = 0; i < scores.size(); ++i)
    if (visible[i]) sum += std::exp(scores[i] - maximum);
  return maximum + std::log(sum);
}

// Streams the scores through RunningSoftmax in tiles of `tile` keys, as the forward kernel does,
// also accumulating sum_i p_i * value_i; returns (lse, normalised weighted value).
std::pair<double, double> streamed(const std::vector<float>& scores, const std::vector<bool>& visible,
                                   const std::vector<float>& values, size_t begin, size_t end, size_t tile) {
  mplug::RunningSoftmax state = mplug::empty_softmax();
  double acc = 0.0;
  for (size_t start = begin; start < end; start += tile) {
    const size_t stop = std::min(end, start + tile);
    float tile_max = -INFINITY;
    for (size_t i = start; i < stop; ++i)
      if (visible[i]) tile_max = std::fmax(tile_max, scores[i] * mplug::kLog2e);
    float shift;
    const float alpha = mplug::rescale_for_tile(state, tile_max, &shift);
    acc *= alpha;
    for (size_t i = start; i < stop; ++i) {
      const float p = visible[i] ? exp2f(scores[i] * mplug::kLog2e - shift) : 0.0f;
      state.sum += p;
      acc += p * values[i];
    }
  }
  return {mplug::row_lse(state), acc * mplug::row_normalizer(state)};
}

void check_row(const std::vector<float>& scores, const std::vector<bool>& visible, const std::vector<float>& values,
               const char* name) {
  const double lse = direct_lse(scores, visible);
  double expected_out = 0.0;
  for (size_t i = 0; i < scores.size(); ++i)
    if (visible[i]) expected_out += std::exp(scores[i] - lse) * values[i];
  const auto [streamed_lse, streamed_out] = streamed(scores, visible, values, 0, scores.size(), 64);
  expect_close(streamed_lse, lse, 1e-5, name);
  expect_close(streamed_out, expected_out, 1e-5, name);

  // split into three key ranges and merge them as the combine kernel does
  const size_t bounds[4] = {0, scores.size() / 3, 2 * scores.size() / 3, scores.size()};
  float part_lse[3];
  double part_out[3];
  float lse_max = -INFINITY;
  for (int s = 0; s < 3; ++s) {
    const auto [l, o] = streamed(scores, visible, values, bounds[s], bounds[s + 1], 64);
    part_lse[s] = static_cast<float>(l);
    part_out[s] = o;
    lse_max = std::fmax(lse_max, part_lse[s]);
  }
  double weight_sum = 0.0, merged = 0.0;
  for (int s = 0; s < 3; ++s) {
    const float w = mplug::merge_weight(part_lse[s], lse_max);
    weight_sum += w;
    merged += w * part_out[s];
  }
  expect_close(mplug::merged_lse(lse_max, static_cast<float>(weight_sum)), lse, 1e-5, name);
  expect_close(weight_sum > 0 ? merged / weight_sum : 0.0, expected_out, 1e-5, name);

  // the backward's probabilities recomputed from lse sum to one over the visible keys
  double total = 0.0;
  for (size_t i = 0; i < scores.size(); ++i)
    if (visible[i]) total += mplug::probability_from_lse(scores[i] * mplug::kLog2e, static_cast<float>(lse));
  expect_close(total, std::isinf(lse) ? 0.0 : 1.0, 1e-5, name);
}

void expect(bool condition, const char* what) {
  if (!condition) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}

// Walks the tiles of the concatenated sources and checks they cover each key once, in order, each key
// located in its own source.
void check_key_tiles(const std::vector<int64_t>& lengths) {
  mplug::AttentionArgs args;
  args.num_sources = static_cast<int>(lengths.size());
  std::vector<std::pair<int, int64_t>> expected;  // (source, row) of each concatenated key
  for (size_t s = 0; s < lengths.size(); ++s) {
    args.sources[s].length = lengths[s];
    for (int64_t row = 0; row < lengths[s]; ++row) expected.emplace_back(static_cast<int>(s), row);
  }
  const int64_t total = static_cast<int64_t>(expected.size());
  const mplug::ConcatKeys keys = mplug::ConcatKeys::of(args);
  expect(keys.total == total, "total keys");
  expect(keys.tile_count() == (total + mplug::kKeysPerTile - 1) / mplug::kKeysPerTile, "ceil(total / 64) tiles");
  int64_t next = 0;
  for (int64_t t = 0; t < keys.tile_count(); ++t) {
    const mplug::KeyTile tile = keys.tile(t);
    expect(tile.start == next, "tiles consecutive");
    expect(tile.end - tile.start >= 1 && tile.end - tile.start <= mplug::kKeysPerTile, "tile holds 1..64 keys");
    expect(tile.end - tile.start == mplug::kKeysPerTile || tile.end == total, "only the last tile is short");
    for (int64_t key = tile.start; key < tile.end; ++key) {
      const mplug::KeyRow at = keys.locate(key);
      expect(at.source == expected[static_cast<size_t>(key)].first, "key in its source");
      expect(at.row == expected[static_cast<size_t>(key)].second, "key at its row");
    }
    next = tile.end;
  }
  expect(next == total, "every key covered");
  expect(keys.tile(keys.tile_count()).start >= keys.tile(keys.tile_count()).end, "no keys past the last tile");
}

}  // namespace

int main() {
  for (const std::vector<int64_t>& lengths : std::vector<std::vector<int64_t>>{
           {577}, {25, 577}, {257, 25}, {25, 77, 3}, {0, 63, 65, 1}, {901, 0, 30, 128}, {1, 2, 3, 4}, {0}}) {
    check_key_tiles(lengths);
  }
  std::mt19937 generator(1234);
  std::normal_distribution<float> normal(0.0f, 3.0f);
  for (size_t length : {1, 63, 64, 65, 577, 1025}) {
    std::vector<float> scores(length), values(length);
    std::vector<bool> all(length, true), some(length), none(length, false);
    for (size_t i = 0; i < length; ++i) {
      scores[i] = normal(generator);
      values[i] = normal(generator);
      some[i] = (i % 7 != 3) || length == 1;
    }
    check_row(scores, all, values, "all keys visible");
    check_row(scores, some, values, "padded keys");
    check_row(scores, none, values, "fully masked row");
    std::vector<bool> first_tile_masked(length, true);
    for (size_t i = 0; i < std::min<size_t>(64, length - 1); ++i) first_tile_masked[i] = false;
    check_row(scores, first_tile_masked, values, "first tile masked");
  }
  std::vector<float> large = {80.0f, 85.0f, -80.0f, 88.0f};
  check_row(large, std::vector<bool>(4, true), large, "large scores");
  if (failures == 0) std::printf("host_test: all checks passed\n");
  return failures == 0 ? 0 : 1;
}
