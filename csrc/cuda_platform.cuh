// The CUDA side of the kernels' platform: toolkit headers, error checks and `launch`. The CPU
// emulator build (csrc/tests/emulator/cpu_platform.h) provides the same names for the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <stdexcept>
#include <string>

#include "attention.h"

namespace mplug {

// Throws std::runtime_error naming `what` when a CUDA call or launch failed.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("mplug_kernels CUDA error in ") + what + ": " + cudaGetErrorName(status) +
                             ": " + cudaGetErrorString(status));
  }
}

// Launches `kernel` with kThreadsPerBlock threads and `smem_bytes` of dynamic shared memory on the
// call's stream; checks both the launch and the shared-memory opt-in.
template <typename Kernel>
void launch(Kernel kernel, const char* name, dim3 grid, size_t smem_bytes, const AttentionArgs& args) {
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
             name);
  kernel<<<grid, kThreadsPerBlock, smem_bytes, static_cast<cudaStream_t>(args.stream)>>>(args);
  check_cuda(cudaGetLastError(), name);
}

}  // namespace mplug
