// Backward kernels instantiated for bfloat16.
#include "backward.cuh"
#include "launchers.h"

namespace mplug {

void backward_bfloat16(const AttentionArgs& args) { backward_for_type<__nv_bfloat16>(args); }

}  // namespace mplug
