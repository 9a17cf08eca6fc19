// Backward kernels instantiated for float16.
#include "backward.cuh"
#include "launchers.h"

namespace mplug {

void backward_float16(const AttentionArgs& args) { backward_for_type<__half>(args); }

}  // namespace mplug
