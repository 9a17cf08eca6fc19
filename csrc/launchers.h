// The per-dtype entry points compiled by nvcc, one translation unit each so they build in parallel.
#pragma once

#include "attention.h"

namespace mplug {

void forward_float16(const AttentionArgs& args);
void forward_bfloat16(const AttentionArgs& args);
int forward_ctas_per_sm_float16(int64_t head_dim, int64_t q_len);
int forward_ctas_per_sm_bfloat16(int64_t head_dim, int64_t q_len);
void backward_float16(const AttentionArgs& args);
void backward_bfloat16(const AttentionArgs& args);

}  // namespace mplug
