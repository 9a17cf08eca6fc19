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
// - wmma and cp.async check their alignment rules; a launch checks its grid and its shared memory
//   against sm_90's limits.
// Errors raise std::runtime_error from the launch, which pybind11 turns into a Python RuntimeError.
// Use: compile the kernel sources with -DMPLUG_PLATFORM_HEADER="cpu_platform.h" and this folder on
// the include path (tests/cuda_emulator.py does).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
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
#define __align__(n) __attribute__((aligned(n)))
#define __shared__

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

inline uint3 threadIdx{0, 0, 0};
inline uint3 blockIdx{0, 0, 0};

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

namespace mplug {

// The block's dynamic shared memory (the kernels declare it `extern __shared__ ... smem[]`).
constexpr size_t kEmulatedSharedBytes = 232448;  // sm_90's opt-in maximum per block
alignas(128) inline unsigned char smem[kEmulatedSharedBytes];

namespace emulator {

constexpr int kLanes = 32;
constexpr int kBlockWarps = kThreadsPerBlock / kLanes;
constexpr size_t kStackBytes = 256 * 1024;

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
  wait_at(r.block, kThreadsPerBlock, site, "__syncthreads");
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
  r.exited = 0;
  r.block = Barrier{};
  for (int w = 0; w < kBlockWarps; ++w) {
    r.warps[w] = Barrier{};
    r.warp_exited[w] = 0;
  }
  for (Thread& thread : r.threads) start_thread(thread);
  while (r.exited < kThreadsPerBlock && r.error.empty()) {
    const uint64_t events_before = r.events;
    for (int w = 0; w < kBlockWarps && r.error.empty(); ++w) {
      run_warp(r.schedule == Schedule::warps_descending ? kBlockWarps - 1 - w : w);
    }
    if (r.error.empty() && r.events == events_before) r.error = "deadlock: every live thread waits at a barrier";
  }
  if (!r.error.empty()) {
    const std::string message = std::string("mplug_kernels emulated CUDA error in ") + name + ": " + r.error;
    r.error.clear();
    throw std::runtime_error(message);
  }
}

inline void run_grid(const char* name, dim3 grid, size_t smem_bytes, std::function<void()> body) {
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
void launch(Kernel kernel, const char* name, dim3 grid, size_t smem_bytes, const AttentionArgs& args) {
  emulator::run_grid(name, grid, smem_bytes, [&] { kernel(args); });
}

}  // namespace mplug

[[gnu::noinline]] inline void __syncthreads() { mplug::emulator::sync_block(__builtin_return_address(0)); }

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

// Tensor-core fragments: every lane holds the whole 16x16 tile as floats (row-major logical
// order). Lanes compute redundantly; stores wait for the warp so no lane overwrites a tile another
// lane has yet to load.
namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements 16x16x16 fragments");
  float x[16 * 16];
};

inline float element_value(__half x) { return __half2float(x); }
inline float element_value(__nv_bfloat16 x) { return __bfloat162float(x); }
inline float element_value(float x) { return x; }

template <typename T>
inline void check_tile(const T* pointer, unsigned ldm, const char* what) {
  mplug::emulator::check_aligned(pointer, 32, what);
  if (ldm % (16 / sizeof(T)) != 0) mplug::emulator::fail(std::string(what) + ": ldm not a multiple of 16 bytes");
}

template <typename T>
inline void load_tile(float* values, const T* pointer, unsigned ldm, bool row_major_memory) {
  for (int row = 0; row < 16; ++row) {
    for (int col = 0; col < 16; ++col) {
      values[row * 16 + col] = element_value(row_major_memory ? pointer[row * ldm + col] : pointer[col * ldm + row]);
    }
  }
}

template <typename Use, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, Layout>& fragment, const T* pointer, unsigned ldm) {
  check_tile(pointer, ldm, "wmma::load_matrix_sync");
  load_tile(fragment.x, pointer, ldm, std::is_same_v<Layout, row_major>);
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& fragment, const float* pointer, unsigned ldm,
                             layout_t layout) {
  check_tile(pointer, ldm, "wmma::load_matrix_sync");
  load_tile(fragment.x, pointer, ldm, layout == mem_row_major);
}

[[gnu::noinline]] inline void store_matrix_sync(float* pointer, const fragment<accumulator, 16, 16, 16, float>& fragment,
                                                unsigned ldm, layout_t layout) {
  check_tile(pointer, ldm, "wmma::store_matrix_sync");
  mplug::emulator::sync_warp(__builtin_return_address(0));
  for (int row = 0; row < 16; ++row) {
    for (int col = 0; col < 16; ++col) {
      const float value = fragment.x[row * 16 + col];
      if (layout == mem_row_major) {
        pointer[row * ldm + col] = value;
      } else {
        pointer[col * ldm + row] = value;
      }
    }
  }
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& fragment, float value) {
  for (float& x : fragment.x) x = value;
}

template <typename T, typename LayoutA, typename LayoutB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LayoutA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LayoutB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  float result[16 * 16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      float sum = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) sum += a.x[i * 16 + k] * b.x[k * 16 + j];
      result[i * 16 + j] = sum;
    }
  }
  std::memcpy(d.x, result, sizeof(result));
}

}  // namespace wmma
}  // namespace nvcuda
