// The per-dtype entry points compiled by nvcc, one translation unit each so they build in parallel.
#pragma once

#include "attention.h"

namespace mplug {

void forward_float16(const AttentionArgs& args);
void forward_bfloat16(const AttentionArgs& args);
void backward_float16(const AttentionArgs& args);
void backward_bfloat16(const AttentionArgs& args);

}  // namespace mplug
