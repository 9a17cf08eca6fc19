// Forward kernels instantiated for bfloat16.
#include "forward_positions.cuh"
#include "launchers.h"

namespace mplug {

void forward_bfloat16(const AttentionArgs& args) { forward_any<__nv_bfloat16>(args); }

int forward_ctas_per_sm_bfloat16(int64_t head_dim, int64_t q_len) { return forward_ctas_per_sm_for_type<__nv_bfloat16>(head_dim, q_len); }

}  // namespace mplug
