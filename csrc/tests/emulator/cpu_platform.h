// CPU emulation of the CUDA features the kernels use, so that the real kernel sources run (slowly)
// on a machine without a GPU and the Python test suite can check them against float64.
//
// Each block runs on its own: its kThreadsPerBlock threads are user-level fibers on one OS thread,
// switched only at barriers, so the emulation is deterministic. Between two __syncthreads one warp
// runs after the other (MPLUG_KERNELS_EMULATOR_SCHEDULE: warps-ascending, the default;
// warps-descending; or lockstep, all warps a step at a time). It is strict where the hardware is
// silent or undefined:
// - shared memory starts as NaN bytes in every block;
// - cp.async copies land at __pipeline_wait_prior, so a read before the wait sees stale data (or,
//   with MPLUG_KERNELS_EMULATOR_EAGER_COPIES=1, at issue, so overwriting a tile that other warps
//   still read shows);
// - __syncthreads reached from different call sites, or after a thread exited, is an error, and so
//   is a barrier that no thread can pass (deadlock);
// - ldmatrix and cp.async check their alignment rules, and ldmatrix that it reads shared
//   memory; a launch checks its grid, its block size and its shared memory against sm_90's limits;
// - mma.sync and ldmatrix are warp-collective: every lane publishes its fragment or row address and
//   takes its result by the PTX ISA's fragment-to-lane layout, so a wrong lane or register shows.
// Launches hold one lock (the emulator's state is global), so several host threads may launch.
// Errors raise std::runtime_error from the launch, which pybind11 turns into a Python RuntimeError.
// Use: compile the kernel sources with -DMPLUG_PLATFORM_HEADER="cpu_platform.h" and this folder on
// the include path (tests/cuda_emulator.py does).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "attention.h"

// Under valgrind the fiber stacks are registered, so switching between them is not read as a stack overflow.
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define MPLUG_EMULATOR_REGISTER_STACK(begin, end) VALGRIND_STACK_REGISTER(begin, end)
#else
#define MPLUG_EMULATOR_REGISTER_STACK(begin, end) 0
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __maxnreg__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__
#define __grid_constant__

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return uint2{x, y}; }

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};
inline dim3 blockDim{1, 1, 1};

template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}

struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half x) {
  _Float16 value;
  std::memcpy(&value, &x.bits, sizeof(value));
  return static_cast<float>(value);
}

inline __half __float2half_rn(float x) {
  const _Float16 value = static_cast<_Float16>(x);
  __half result;
  std::memcpy(&result.bits, &value, sizeof(value));
  return result;
}

inline float __bfloat162float(__nv_bfloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.bits) << 16;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline __nv_bfloat16 __float2bfloat16_rn(float x) {
  if (std::isnan(x)) return __nv_bfloat16{0x7fc0};
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return __nv_bfloat16{static_cast<uint16_t>(bits >> 16)};
}

struct __half2 {
  __half x, y;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
inline __half2 __floats2half2_rn(float lo, float hi) { return __half2{__float2half_rn(lo), __float2half_rn(hi)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return __nv_bfloat162{__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}

namespace mplug {

// The block's dynamic shared memory (the kernels declare it `extern __shared__ ... smem[]`).
constexpr size_t kEmulatedSharedBytes = 232448;  // sm_90's opt-in maximum per block
alignas(128) inline unsigned char smem[kEmulatedSharedBytes];

namespace emulator {

constexpr int kLanes = 32;
constexpr int kBlockWarps = kThreadsPerBlock / kLanes;  // the most warps a block may have
constexpr size_t kStackBytes = 256 * 1024;
constexpr int kLaneBytes = 32;  // what one lane publishes to a warp-collective operation

struct Copy {
  void* destination;
  const void* source;
  size_t bytes;
};

struct Thread {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  bool done = false;
  std::vector<std::vector<Copy>> committed;  // oldest group first
  std::vector<Copy> open;                    // issued since the last __pipeline_commit
};

struct Barrier {
  int arrived = 0;
  unsigned generation = 0;
  const void* site = nullptr;
};

// The order in which a block's warps run between two __syncthreads: one warp after the other
// (ascending, the default, or descending), so that a warp racing ahead of the others overwrites
// what they have yet to read; or all warps a step at a time (lockstep).
enum class Schedule { warps_ascending, warps_descending, lockstep };

struct Runtime {
  ucontext_t scheduler;
  std::vector<Thread> threads = std::vector<Thread>(kThreadsPerBlock);
  int current = 0;
  int exited = 0;
  uint64_t events = 0;
  Barrier block;
  Barrier warps[kBlockWarps];
  int warp_exited[kBlockWarps] = {};
  float exchange[kBlockWarps][2][kLanes];
  alignas(16) unsigned char lane_bytes[kBlockWarps][2][kLanes][kLaneBytes];
  int block_and[2] = {1, 1};  // __syncthreads_and of the barrier generations by parity
  int block_count[2] = {0, 0};  // __syncthreads_count of the barrier generations by parity
  int block_threads = kThreadsPerBlock;
  bool eager_copies = false;
  Schedule schedule = Schedule::warps_ascending;
  std::string error;
  std::function<void()> body;
};

inline Runtime& runtime() {
  static Runtime instance;
  return instance;
}

inline void yield() {
  Runtime& r = runtime();
  swapcontext(&r.threads[r.current].context, &r.scheduler);
}

// Records the first error, naming the current block and thread; the launch raises it.
inline void record_error(const std::string& message) {
  Runtime& r = runtime();
  if (r.error.empty()) {
    r.error = message + " (block " + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
              std::to_string(blockIdx.z) + ", thread " + std::to_string(threadIdx.x) + ")";
  }
}

// Records an error and stops this thread for good.
[[noreturn]] inline void fail(const std::string& message) {
  record_error(message);
  for (;;) yield();
}

// Waits until `count` threads have arrived at `barrier` from the same call site.
inline void wait_at(Barrier& barrier, int count, const void* site, const char* what) {
  Runtime& r = runtime();
  if (barrier.arrived == 0) {
    barrier.site = site;
  } else if (barrier.site != site) {
    fail(std::string("threads reached different ") + what + " call sites");
  }
  ++r.events;
  const unsigned generation = barrier.generation;
  if (++barrier.arrived == count) {
    barrier.arrived = 0;
    ++barrier.generation;
    return;
  }
  while (barrier.generation == generation) yield();
}

inline int warp_of_current() { return static_cast<int>(threadIdx.x) / kLanes; }

[[gnu::noinline]] inline void sync_block(const void* site) {
  Runtime& r = runtime();
  if (r.exited > 0) fail("__syncthreads after some threads of the block exited");
  wait_at(r.block, r.block_threads, site, "__syncthreads");
}

inline void check_full_mask(unsigned mask, const char* what) {
  if (mask != 0xffffffffu) fail(std::string(what) + " with a partial lane mask is not emulated");
}

inline void sync_warp(const void* site) {
  Runtime& r = runtime();
  const int warp = warp_of_current();
  if (r.warp_exited[warp] > 0) fail("warp-synchronous call after some lanes of the warp exited");
  wait_at(r.warps[warp], kLanes, site, "warp-synchronous");
}

// The value `source_lane` passed to the same shuffle; every lane of the warp must take part.
[[gnu::noinline]] inline float exchange(float value, int source_lane) {
  Runtime& r = runtime();
  const int warp = warp_of_current();
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  float(&slots)[kLanes] = r.exchange[warp][r.warps[warp].generation & 1];
  slots[lane] = value;
  sync_warp(__builtin_return_address(0));
  return slots[source_lane & (kLanes - 1)];
}

// Every lane of the warp publishes `bytes` bytes at the same call site `site`; returns the warp's
// [kLanes][kLaneBytes] table of what each lane published, valid until the warp's next collective.
inline const unsigned char (&exchange_bytes(const void* data, size_t bytes, const void* site))[kLanes][kLaneBytes] {
  Runtime& r = runtime();
  const int warp = warp_of_current();
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  auto& table = r.lane_bytes[warp][r.warps[warp].generation & 1];
  std::memcpy(table[lane], data, bytes);
  sync_warp(site);
  return table;
}

inline void check_aligned(const void* pointer, size_t alignment, const char* what) {
  if (reinterpret_cast<uintptr_t>(pointer) % alignment != 0) {
    fail(std::string(what) + ": pointer not " + std::to_string(alignment) + "-byte aligned");
  }
}

inline void complete(const std::vector<Copy>& copies) {
  for (const Copy& copy : copies) std::memcpy(copy.destination, copy.source, copy.bytes);
}

inline void thread_main() {
  Runtime& r = runtime();
  r.body();
  Thread& self = r.threads[r.current];
  const int warp = warp_of_current();
  if (r.block.arrived > 0 || r.warps[warp].arrived > 0) {
    record_error("a thread exited while others of its block or warp wait at a barrier");
  }
  self.done = true;
  ++r.exited;
  ++r.warp_exited[warp];
  ++r.events;
  swapcontext(&self.context, &r.scheduler);
}

inline void start_thread(Thread& thread) {
  if (!thread.stack) {
    thread.stack.reset(new char[kStackBytes]);
    static_cast<void>(MPLUG_EMULATOR_REGISTER_STACK(thread.stack.get(), thread.stack.get() + kStackBytes));
  }
  getcontext(&thread.context);
  thread.context.uc_stack.ss_sp = thread.stack.get();
  thread.context.uc_stack.ss_size = kStackBytes;
  thread.context.uc_link = nullptr;
  makecontext(&thread.context, thread_main, 0);
  thread.done = false;
  thread.committed.clear();
  thread.open.clear();
}

// Resumes each live lane of `warp` once.
inline void resume_lanes(int warp) {
  Runtime& r = runtime();
  for (int t = warp * kLanes; t < (warp + 1) * kLanes && r.error.empty(); ++t) {
    if (r.threads[t].done) continue;
    r.current = t;
    threadIdx = uint3{static_cast<unsigned>(t), 0, 0};
    swapcontext(&r.scheduler, &r.threads[t].context);
  }
}

// Runs `warp` one step (lockstep), or until all its lanes wait at __syncthreads or exited.
inline void run_warp(int warp) {
  Runtime& r = runtime();
  if (r.schedule == Schedule::lockstep) return resume_lanes(warp);
  uint64_t events_before;
  do {
    events_before = r.events;
    resume_lanes(warp);
  } while (r.events != events_before && r.error.empty());
}

// Runs one block: every thread until it exits; raises on an emulation error or a deadlock.
inline void run_block(const char* name) {
  Runtime& r = runtime();
  const int block_warps = r.block_threads / kLanes;
  r.exited = 0;
  r.block = Barrier{};
  for (int w = 0; w < kBlockWarps; ++w) {
    r.warps[w] = Barrier{};
    r.warp_exited[w] = 0;
  }
  for (int t = 0; t < r.block_threads; ++t) start_thread(r.threads[t]);
  while (r.exited < r.block_threads && r.error.empty()) {
    const uint64_t events_before = r.events;
    for (int w = 0; w < block_warps && r.error.empty(); ++w) {
      run_warp(r.schedule == Schedule::warps_descending ? block_warps - 1 - w : w);
    }
    if (r.error.empty() && r.events == events_before) r.error = "deadlock: every live thread waits at a barrier";
  }
  if (!r.error.empty()) {
    const std::string message = std::string("mplug_kernels emulated CUDA error in ") + name + ": " + r.error;
    r.error.clear();
    throw std::runtime_error(message);
  }
}

inline std::mutex& launch_lock() {
  static std::mutex lock;
  return lock;
}

// Runs `body` as every thread of every block of `grid`, `threads` threads per block (a multiple
// of 32, at most kThreadsPerBlock); one launch at a time in the process.
inline void run_grid(const char* name, dim3 grid, size_t smem_bytes, std::function<void()> body,
                     int threads = kThreadsPerBlock) {
  const std::lock_guard<std::mutex> hold(launch_lock());
  if (threads <= 0 || threads > kThreadsPerBlock || threads % kLanes != 0) {
    throw std::runtime_error(std::string("mplug_kernels emulated CUDA error in ") + name + ": " +
                             std::to_string(threads) + " threads per block (the emulator runs 32.." +
                             std::to_string(kThreadsPerBlock) + ", whole warps)");
  }
  if (smem_bytes > kEmulatedSharedBytes) {
    throw std::runtime_error(std::string("mplug_kernels emulated CUDA error in ") + name + ": " +
                             std::to_string(smem_bytes) + " bytes of shared memory > sm_90's " +
                             std::to_string(kEmulatedSharedBytes));
  }
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535) {
    throw std::runtime_error(std::string("mplug_kernels emulated CUDA error in ") + name + ": invalid grid");
  }
  Runtime& r = runtime();
  r.body = std::move(body);
  r.block_threads = threads;
  blockDim = dim3(static_cast<unsigned>(threads));
  // cp.async copies land when issued instead of at __pipeline_wait_prior: catches a tile
  // overwritten while other warps still read it, where the default catches a read before the wait
  const char* eager = std::getenv("MPLUG_KERNELS_EMULATOR_EAGER_COPIES");
  r.eager_copies = eager != nullptr && std::string(eager) == "1";
  const char* schedule = std::getenv("MPLUG_KERNELS_EMULATOR_SCHEDULE");
  const std::string order = schedule != nullptr ? schedule : "warps-ascending";
  if (order == "warps-ascending") {
    r.schedule = Schedule::warps_ascending;
  } else if (order == "warps-descending") {
    r.schedule = Schedule::warps_descending;
  } else if (order == "lockstep") {
    r.schedule = Schedule::lockstep;
  } else {
    throw std::runtime_error("MPLUG_KERNELS_EMULATOR_SCHEDULE must be warps-ascending, warps-descending or lockstep, got '" +
                             order + "'");
  }
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        std::memset(smem, 0xff, smem_bytes);
        run_block(name);
      }
    }
  }
}

}  // namespace emulator

template <typename Kernel>
void launch(Kernel kernel, const char* name, dim3 grid, int threads, size_t smem_bytes, const AttentionArgs& args) {
  emulator::run_grid(name, grid, smem_bytes, [&] { kernel(args); }, threads);
}

template <typename Kernel>
void launch(Kernel kernel, const char* name, dim3 grid, size_t smem_bytes, const AttentionArgs& args) {
  launch(kernel, name, grid, kThreadsPerBlock, smem_bytes, args);
}

// The CTAs per multiprocessor of an H100 (SXM) for `threads` threads and `smem_bytes` of shared
// memory per CTA, from its thread (2048), CTA (32) and shared-memory (228 KB, 1 KB reserved per
// CTA) limits; registers are not modelled (the emulator has none), so this is an upper bound.
template <typename Kernel>
int ctas_per_multiprocessor(Kernel, const char*, int threads, size_t smem_bytes) {
  constexpr size_t kSharedPerSm = 233472;
  constexpr size_t kReservedPerCta = 1024;
  const int by_threads = 2048 / threads;
  const int by_smem = static_cast<int>(kSharedPerSm / (smem_bytes + kReservedPerCta));
  return std::max(1, std::min({32, by_threads, by_smem}));
}

namespace emulator {

inline float element_to_float(__half, uint16_t bits) { return __half2float(__half{bits}); }
inline float element_to_float(__nv_bfloat16, uint16_t bits) { return __bfloat162float(__nv_bfloat16{bits}); }

// Element `half` (0: low 16 bits) of register `reg` as published by `lane`.
inline uint16_t published_half(const unsigned char (&table)[kLanes][kLaneBytes], int lane, int reg, int half) {
  uint16_t value;
  std::memcpy(&value, table[lane] + 4 * reg + 2 * half, sizeof(value));
  return value;
}

struct MmaFragments {
  uint32_t a[4];
  uint32_t b[2];
};

}  // namespace emulator

// 2^x as ex2.approx.ftz computes it, to float rounding (the hardware's is within 2 ulp).
inline float exp2_approx(float x) {
  const float y = std::exp2(x);
  return std::fpclassify(y) == FP_SUBNORMAL ? 0.0f : y;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: acc += A * B with the fragment layouts of
// cuda_platform.cuh; A and B come from the lanes that hold them by those layouts.
template <typename T>
[[gnu::noinline]] void mma_m16n8k16(float (&acc)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  using namespace emulator;
  const MmaFragments mine{{a[0], a[1], a[2], a[3]}, {b[0], b[1]}};
  const auto& table = exchange_bytes(&mine, sizeof(mine), __builtin_return_address(0));
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  const int g = lane / 4, t = lane % 4;
  constexpr int kBRegister = offsetof(MmaFragments, b) / 4;
  float result[4];
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i / 2);
    const int col = 2 * t + i % 2;
    float sum = acc[i];
    for (int k = 0; k < 16; ++k) {
      // A[row][k]: lane 4 (row % 8) + (k % 8) / 2, register row / 8 + 2 (k / 8), half k % 2
      const float a_value =
          element_to_float(T{}, published_half(table, 4 * (row % 8) + (k % 8) / 2, row / 8 + 2 * (k / 8), k % 2));
      // B[k][col]: lane 4 col + (k % 8) / 2, register k / 8, half k % 2
      const float b_value =
          element_to_float(T{}, published_half(table, 4 * col + (k % 8) / 2, kBRegister + k / 8, k % 2));
      sum += a_value * b_value;
    }
    result[i] = sum;
  }
  for (int i = 0; i < 4; ++i) acc[i] = result[i];
}

namespace emulator {

// Publishes the 16-byte row at `smem_row` (lanes < 8 * matrices) and returns the warp's rows:
// row r of matrix i is table[8 i + r].
inline const unsigned char (&ldmatrix_rows(int matrices, const void* smem_row, const void* site))[kLanes][kLaneBytes] {
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  unsigned char row[16] = {};
  if (lane < 8 * matrices) {
    const auto* address = static_cast<const unsigned char*>(smem_row);
    if (address < smem || address + 16 > smem + kEmulatedSharedBytes) fail("ldmatrix: row address not in shared memory");
    check_aligned(smem_row, 16, "ldmatrix row");
    std::memcpy(row, address, 16);
  }
  return exchange_bytes(row, sizeof(row), site);
}

// The 16-bit element (row, col) of matrix `matrix` from the warp's published rows.
inline uint32_t matrix_element(const unsigned char (&table)[kLanes][kLaneBytes], int matrix, int row, int col) {
  uint16_t value;
  std::memcpy(&value, table[8 * matrix + row] + 2 * col, sizeof(value));
  return value;
}

}  // namespace emulator

// ldmatrix.sync.aligned.m8n8.x{N}.shared.b16: regs[i] of lane l holds row l / 4, columns 2 (l % 4) + {0, 1} of matrix i.
template <int N>
[[gnu::noinline]] void ldmatrix(uint32_t (&regs)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  using namespace emulator;
  const auto& table = ldmatrix_rows(N, smem_row, __builtin_return_address(0));
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  for (int i = 0; i < N; ++i) {
    regs[i] = matrix_element(table, i, lane / 4, 2 * (lane % 4)) |
              matrix_element(table, i, lane / 4, 2 * (lane % 4) + 1) << 16;
  }
}

// ldmatrix with .trans: regs[i] of lane l holds rows 2 (l % 4) + {0, 1}, column l / 4 of matrix i.
template <int N>
[[gnu::noinline]] void ldmatrix_trans(uint32_t (&regs)[N], const void* smem_row) {
  static_assert(N == 1 || N == 2 || N == 4, "ldmatrix loads 1, 2 or 4 matrices");
  using namespace emulator;
  const auto& table = ldmatrix_rows(N, smem_row, __builtin_return_address(0));
  const int lane = static_cast<int>(threadIdx.x) % kLanes;
  for (int i = 0; i < N; ++i) {
    regs[i] = matrix_element(table, i, 2 * (lane % 4), lane / 4) |
              matrix_element(table, i, 2 * (lane % 4) + 1, lane / 4) << 16;
  }
}

}  // namespace mplug

[[gnu::noinline]] inline void __syncthreads() { mplug::emulator::sync_block(__builtin_return_address(0)); }

// __syncthreads that also returns whether `predicate` was non-zero in every thread of the block.
[[gnu::noinline]] inline int __syncthreads_and(int predicate) {
  mplug::emulator::Runtime& r = mplug::emulator::runtime();
  const unsigned parity = r.block.generation & 1u;
  if (r.block.arrived == 0) r.block_and[parity] = 1;
  if (predicate == 0) r.block_and[parity] = 0;
  mplug::emulator::sync_block(__builtin_return_address(0));
  return r.block_and[parity];
}

// __syncthreads that also returns how many threads of the block passed a non-zero `predicate`.
[[gnu::noinline]] inline int __syncthreads_count(int predicate) {
  mplug::emulator::Runtime& r = mplug::emulator::runtime();
  const unsigned parity = r.block.generation & 1u;
  if (r.block.arrived == 0) r.block_count[parity] = 0;
  if (predicate != 0) ++r.block_count[parity];
  mplug::emulator::sync_block(__builtin_return_address(0));
  return r.block_count[parity];
}

[[gnu::noinline]] inline void __syncwarp(unsigned mask = 0xffffffffu) {
  mplug::emulator::check_full_mask(mask, "__syncwarp");
  mplug::emulator::sync_warp(__builtin_return_address(0));
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  mplug::emulator::check_full_mask(mask, "__shfl_xor_sync");
  return mplug::emulator::exchange(value, (static_cast<int>(threadIdx.x) % 32) ^ lane_mask);
}

inline float __shfl_sync(unsigned mask, float value, int source_lane) {
  mplug::emulator::check_full_mask(mask, "__shfl_sync");
  return mplug::emulator::exchange(value, source_lane);
}

// Whether `predicate` is non-zero in every lane of the warp (a butterfly of shuffles).
inline int __all_sync(unsigned mask, int predicate) {
  float all = predicate != 0 ? 1.0f : 0.0f;
  for (int offset = 16; offset > 0; offset /= 2) all = std::fmin(all, __shfl_xor_sync(mask, all, offset));
  return all != 0.0f;
}

inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}

inline void __pipeline_memcpy_async(void* destination, const void* source, size_t bytes) {
  using namespace mplug::emulator;
  if (bytes != 4 && bytes != 8 && bytes != 16) fail("__pipeline_memcpy_async copies 4, 8 or 16 bytes");
  check_aligned(destination, bytes, "__pipeline_memcpy_async destination");
  check_aligned(source, bytes, "__pipeline_memcpy_async source");
  Runtime& r = runtime();
  if (r.eager_copies) {
    std::memcpy(destination, source, bytes);
  } else {
    r.threads[r.current].open.push_back(Copy{destination, source, bytes});
  }
}

inline void __pipeline_commit() {
  using namespace mplug::emulator;
  Thread& self = runtime().threads[runtime().current];
  self.committed.push_back(std::move(self.open));
  self.open.clear();
}

inline void __pipeline_wait_prior(size_t pending) {
  using namespace mplug::emulator;
  Thread& self = runtime().threads[runtime().current];
  while (self.committed.size() > pending) {
    complete(self.committed.front());
    self.committed.erase(self.committed.begin());
  }
}

