// The CUDA side of the kernels' platform: toolkit headers, error checks and `launch`. The CPU
// emulator build (csrc/tests/emulator/cpu_platform.h) provides the same names for the host compiler.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_pipeline.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>

#include "attention.h"

namespace mplug {

// Throws std::runtime_error naming `what` when a CUDA call or launch failed.
inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    throw std::runtime_error(std::string("mplug_kernels CUDA error in ") + what + ": " + cudaGetErrorName(status) +
                             ": " + cudaGetErrorString(status));
  }
}

// Tensor-core and shared-memory fragment primitives (PTX ISA, "Warp-level matrix instructions").
// Fragment layouts, with g = lane / 4 and t = lane % 4:
// - A (16x16, row-major), a[i] holds A[g + 8 * (i % 2)][2t + 8 * (i / 2) + {0, 1}];
// - B (16x8, "col"), b[i] holds B[2t + 8 * i + {0, 1}][g];
// - C/D (16x8, float), acc[i] is C[g + 8 * (i / 2)][2t + i % 2].
// acc += A * B; T (__half or __nv_bfloat16) is the element type of A and B, two per register (low half first).
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void mma_m16n8k16<__half>(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_m16n8k16<__nv_bfloat16>(float (&acc)[4], const uint32_t (&a)[4],
                                                             const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(acc[0]), "+f"(acc[1]), "+f"(acc[2]), "+f"(acc[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// 2^x by the special function unit (ex2.approx.ftz: denormal results flush to 0; 2^-inf = 0).
__device__ __forceinline__ float exp2_approx(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// N 8x8 matrices of 16-bit elements from shared memory: lane 8i + r passes the 16-byte-aligned
// address of row r of matrix i (lanes >= 8N pass any address). regs[i] of lane l holds row l / 4,
// columns 2 (l % 4) + {0, 1} of matrix i.
template <int N>
__device__ __forceinline__ void ldmatrix(uint32_t (&regs)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t address = shared_address(smem_row);
  if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(address));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                 : "r"(address));
  }
}

// As ldmatrix, each matrix transposed: regs[i] of lane l holds rows 2 (l % 4) + {0, 1}, column l / 4 of matrix i.
template <int N>
__device__ __forceinline__ void ldmatrix_trans(uint32_t (&regs)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  const uint32_t address = shared_address(smem_row);
  if constexpr (N == 1) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x1.trans.shared.b16 {%0}, [%1];\n" : "=r"(regs[0]) : "r"(address));
  } else if constexpr (N == 2) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
                 : "=r"(regs[0]), "=r"(regs[1])
                 : "r"(address));
  } else {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(regs[0]), "=r"(regs[1]), "=r"(regs[2]), "=r"(regs[3])
                 : "r"(address));
  }
}

// Opts `kernel` in to `smem_bytes` of dynamic shared memory on the current device: once per kernel, device and
// size (not on every call), and never at or below the 48 KB every kernel may use without it.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, const char* name, size_t smem_bytes) {
  constexpr size_t kDefaultLimit = 48 * 1024;
  if (smem_bytes <= kDefaultLimit) return;
  int device = 0;
  check_cuda(cudaGetDevice(&device), name);
  static std::mutex guard;
  static std::set<std::tuple<const void*, int, size_t>> allowed;
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, smem_bytes);
  std::lock_guard<std::mutex> lock(guard);
  if (allowed.count(key) != 0) return;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes)),
             name);
  allowed.insert(key);
}

// Launches `kernel` with `threads` threads and `smem_bytes` of dynamic shared memory on the
// call's stream; checks both the launch and the shared-memory opt-in.
template <typename Kernel>
void launch(Kernel kernel, const char* name, dim3 grid, int threads, size_t smem_bytes, const AttentionArgs& args) {
  allow_shared_memory(kernel, name, smem_bytes);
  kernel<<<grid, threads, smem_bytes, static_cast<cudaStream_t>(args.stream)>>>(args);
  check_cuda(cudaGetLastError(), name);
}

// CTAs of `kernel` that fit on one multiprocessor of the current device with `threads` threads
// and `smem_bytes` of dynamic shared memory (registers, shared memory and thread limits).
template <typename Kernel>
int ctas_per_multiprocessor(Kernel kernel, const char* name, int threads, size_t smem_bytes) {
  allow_shared_memory(kernel, name, smem_bytes);
  int ctas = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(&ctas, reinterpret_cast<const void*>(kernel), threads,
                                                                    smem_bytes, cudaOccupancyDefault),
             name);
  return ctas;
}

// Launches `kernel` with kThreadsPerBlock threads and `smem_bytes` of dynamic shared memory on the
// call's stream; checks both the launch and the shared-memory opt-in.
template <typename Kernel>
void launch(Kernel kernel, const char* name, dim3 grid, size_t smem_bytes, const AttentionArgs& args) {
  launch(kernel, name, grid, kThreadsPerBlock, smem_bytes, args);
}

}  // namespace mplug
