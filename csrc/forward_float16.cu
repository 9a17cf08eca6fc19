// Forward kernels instantiated for float16.
#include "forward_positions.cuh"
#include "launchers.h"

namespace mplug {

void forward_float16(const AttentionArgs& args) { forward_any<__half>(args); }

int forward_ctas_per_sm_float16(int64_t head_dim, int64_t q_len) { return forward_ctas_per_sm_for_type<__half>(head_dim, q_len); }

}  // namespace mplug
