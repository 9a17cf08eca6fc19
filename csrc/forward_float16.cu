// Forward kernels instantiated for float16.
#include "forward.cuh"
#include "launchers.h"

namespace mplug {

void forward_float16(const AttentionArgs& args) { forward_for_type<__half>(args); }

}  // namespace mplug
