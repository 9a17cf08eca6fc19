// Per-row softmax arithmetic shared by the CUDA kernels and the host-side unit test.
// Scores are kept in log2 units (score * scale * log2(e)) so that exp2 is the only exponential.
#pragma once

#include <cmath>

#include "host_device.h"

namespace mplug {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// Running maximum (log2 units) and running sum of exp2(score - maximum) of one query row.
struct RunningSoftmax {
  float max_log2;
  float sum;
};

MPLUG_HD RunningSoftmax empty_softmax() { return RunningSoftmax{-INFINITY, 0.0f}; }

// A maximum that is safe to subtract: -inf (nothing seen yet) becomes 0.
MPLUG_HD float finite_or_zero(float maximum) { return maximum == -INFINITY ? 0.0f : maximum; }

// Moves `state` to the maximum including a new tile whose largest score is `tile_max`; returns
// the factor by which earlier sums and outputs shrink. Exponentials of the tile use `*shift`.
MPLUG_HD float rescale_for_tile(RunningSoftmax& state, float tile_max, float* shift) {
  const float new_max = fmaxf(state.max_log2, tile_max);
  *shift = finite_or_zero(new_max);
  const float alpha = exp2f(state.max_log2 - *shift);
  state.max_log2 = new_max;
  state.sum *= alpha;
  return alpha;
}

// Natural-log log-sum-exp of the row; -inf for a row with no visible key, NaN where the sum is NaN
// (a NaN score), so lse is NaN exactly where the output is.
MPLUG_HD float row_lse(const RunningSoftmax& state) {
  return state.sum == 0.0f ? -INFINITY : (state.max_log2 + log2f(state.sum)) * kLn2;
}

// 1 / sum, or 0 for a row with no visible key (its output is then 0); NaN stays NaN.
MPLUG_HD float row_normalizer(const RunningSoftmax& state) { return state.sum == 0.0f ? 0.0f : 1.0f / state.sum; }

// Softmax probability of a score (log2 units) recomputed from the row's natural-log lse.
MPLUG_HD float probability_from_lse(float score_log2, float lse) {
  return lse == -INFINITY ? 0.0f : exp2f(score_log2 - lse * kLog2e);
}

// Weight of one split's partial output when merging splits whose largest lse is `max_lse`.
MPLUG_HD float merge_weight(float part_lse, float max_lse) { return expf(part_lse - finite_or_zero(max_lse)); }

// lse of the merged row from the largest partial lse and the sum of merge weights (NaN when a
// split's lse is NaN, -inf when no split saw a visible key).
MPLUG_HD float merged_lse(float max_lse, float weight_sum) {
  return weight_sum == 0.0f ? -INFINITY : finite_or_zero(max_lse) + logf(weight_sum);
}

// 1 / weight_sum, 0 when no split saw a visible key; NaN stays NaN.
MPLUG_HD float merged_normalizer(float weight_sum) { return weight_sum == 0.0f ? 0.0f : 1.0f / weight_sum; }

}  // namespace mplug
