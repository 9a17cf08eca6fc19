// Forward kernels instantiated for bfloat16.
#include "forward.cuh"
#include "launchers.h"

namespace mplug {

void forward_bfloat16(const AttentionArgs& args) { forward_for_type<__nv_bfloat16>(args); }

}  // namespace mplug
