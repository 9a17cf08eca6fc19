// Self-test of the CPU emulator (cpu_platform.h): the CUDA features the kernels use behave as on a
// GPU, and the mistakes it promises to catch raise errors. Exit status 0 when every check passes.
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu_platform.h"

namespace {

using mplug::kThreadsPerBlock;
using mplug::smem;
using mplug::emulator::run_grid;

int failures = 0;

void expect(bool condition, const std::string& what) {
  if (!condition) {
    std::printf("FAIL %s\n", what.c_str());
    ++failures;
  }
}

// Runs `body` on `grid` blocks; returns the emulator's error message, or "" when there was none.
std::string error_of(dim3 grid, size_t smem_bytes, std::function<void()> body) {
  try {
    run_grid("test_kernel", grid, smem_bytes, std::move(body));
  } catch (const std::runtime_error& error) {
    return error.what();
  }
  return "";
}

bool mentions(const std::string& message, const std::string& part) { return message.find(part) != std::string::npos; }

void shuffles_reduce_and_broadcast() {
  std::vector<float> sums(kThreadsPerBlock), broadcasts(kThreadsPerBlock);
  const std::string error = error_of(dim3(1), 0, [&] {
    const int lane = threadIdx.x % 32;
    float x = static_cast<float>(lane);
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
    sums[threadIdx.x] = x;
    broadcasts[threadIdx.x] = __shfl_sync(0xffffffffu, static_cast<float>(threadIdx.x), 5);
  });
  expect(error.empty(), "shuffles ran: " + error);
  for (int t = 0; t < kThreadsPerBlock; ++t) {
    expect(sums[t] == 496.0f, "warp sum of lanes is 496");
    expect(broadcasts[t] == static_cast<float>(t / 32 * 32 + 5), "__shfl_sync reads lane 5 of the own warp");
  }
}

void syncthreads_orders_shared_memory() {
  std::vector<int> seen(kThreadsPerBlock);
  const std::string error = error_of(dim3(1), kThreadsPerBlock * sizeof(int), [&] {
    int* slots = reinterpret_cast<int*>(smem);
    slots[threadIdx.x] = static_cast<int>(threadIdx.x) * 3;
    __syncthreads();
    seen[threadIdx.x] = slots[(threadIdx.x + 1) % kThreadsPerBlock];
  });
  expect(error.empty(), "barrier kernel ran: " + error);
  for (int t = 0; t < kThreadsPerBlock; ++t) expect(seen[t] == (t + 1) % kThreadsPerBlock * 3, "neighbour's value after __syncthreads");
}

void a_missing_syncthreads_shows_as_unwritten_shared_memory() {
  bool neighbour_unwritten = false;
  const std::string error = error_of(dim3(1), kThreadsPerBlock * sizeof(float), [&] {
    float* slots = reinterpret_cast<float*>(smem);
    slots[threadIdx.x] = 1.0f;
    // reads the next warp's slot with no __syncthreads in between
    if (threadIdx.x == 0) neighbour_unwritten = std::isnan(slots[32]);
  });
  expect(error.empty() && neighbour_unwritten, "warp 0 runs ahead of warp 1 and sees its slot unwritten");
}

void every_block_runs_once_with_fresh_nan_shared_memory() {
  std::vector<int> runs(2 * 3 * 4, 0);
  bool all_nan = true;
  const std::string error = error_of(dim3(2, 3, 4), 64, [&] {
    const float first = reinterpret_cast<const float*>(smem)[threadIdx.x % 16];
    all_nan = all_nan && std::isnan(first);
    __syncthreads();
    if (threadIdx.x == 0) {
      ++runs[(blockIdx.z * 3 + blockIdx.y) * 2 + blockIdx.x];
      reinterpret_cast<float*>(smem)[0] = 1.0f;
    }
  });
  expect(error.empty(), "grid ran: " + error);
  for (int count : runs) expect(count == 1, "each block of a 2x3x4 grid runs once");
  expect(all_nan, "shared memory reads NaN before it is written, in every block");
}

void async_copies_land_at_the_wait() {
  alignas(16) static float source[kThreadsPerBlock * 4];
  for (int i = 0; i < kThreadsPerBlock * 4; ++i) source[i] = static_cast<float>(i);
  for (const char* eager : {"0", "1"}) {
    setenv("MPLUG_KERNELS_EMULATOR_EAGER_COPIES", eager, 1);
    bool before_wait_was_copied = true, after_wait_was_copied = true;
    const std::string error = error_of(dim3(1), sizeof(source), [&] {
      float* tile = reinterpret_cast<float*>(smem);
      const int t = threadIdx.x;
      __pipeline_memcpy_async(tile + 4 * t, source + 4 * t, 16);
      __pipeline_commit();
      before_wait_was_copied = before_wait_was_copied && tile[4 * t] == source[4 * t];
      __pipeline_wait_prior(0);
      after_wait_was_copied = after_wait_was_copied && tile[4 * t + 3] == source[4 * t + 3];
    });
    expect(error.empty(), "copy kernel ran: " + error);
    expect(after_wait_was_copied, "copies have landed after __pipeline_wait_prior(0)");
    expect(before_wait_was_copied == (std::string(eager) == "1"),
           std::string("copies land before the wait only in eager mode (eager=") + eager + ")");
  }
  unsetenv("MPLUG_KERNELS_EMULATOR_EAGER_COPIES");
}

void wait_prior_keeps_the_newest_groups_pending() {
  alignas(16) static float source[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  bool first_landed = false, second_pending = false;
  const std::string error = error_of(dim3(1), 64, [&] {
    float* tile = reinterpret_cast<float*>(smem);
    if (threadIdx.x == 0) {
      __pipeline_memcpy_async(tile, source, 16);
      __pipeline_commit();
      __pipeline_memcpy_async(tile + 4, source + 4, 16);
      __pipeline_commit();
      __pipeline_wait_prior(1);
      first_landed = tile[0] == 1.0f;
      second_pending = std::isnan(tile[4]);
    }
  });
  expect(error.empty(), "pipeline kernel ran: " + error);
  expect(first_landed && second_pending, "__pipeline_wait_prior(1) completes all but the newest group");
}

void wmma_multiplies_like_float_math() {
  using namespace nvcuda;
  std::mt19937 random(3);
  std::normal_distribution<float> normal;
  alignas(32) static __half a[16 * 32];  // row-major [16, 32]
  alignas(32) static __half b[16 * 32];  // col-major [32, 16]: b[n * 32 + k]
  alignas(32) static float c[16 * 16];
  for (auto& x : a) x = __float2half_rn(normal(random));
  for (auto& x : b) x = __float2half_rn(normal(random));
  const std::string error = error_of(dim3(1), 0, [&] {
    if (threadIdx.x >= 32) return;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
    for (int k = 0; k < 2; ++k) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a_frag;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b_frag;
      wmma::load_matrix_sync(a_frag, a + 16 * k, 32);
      wmma::load_matrix_sync(b_frag, b + 16 * k, 32);
      wmma::mma_sync(acc, a_frag, b_frag, acc);
    }
    wmma::store_matrix_sync(c, acc, 16, wmma::mem_row_major);
  });
  expect(error.empty(), "wmma kernel ran: " + error);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      double expected = 0.0;
      for (int k = 0; k < 32; ++k) expected += double(__half2float(a[i * 32 + k])) * __half2float(b[j * 32 + k]);
      expect(std::fabs(c[i * 16 + j] - expected) < 1e-4 * (1.0 + std::fabs(expected)), "wmma product element");
    }
  }
}

void atomics_add_up() {
  float total = 0.0f;
  const std::string error = error_of(dim3(3), 0, [&] { atomicAdd(&total, 1.0f); });
  expect(error.empty() && total == 3.0f * kThreadsPerBlock, "atomicAdd from every thread of 3 blocks");
}

void half_and_bfloat16_round_to_nearest_even() {
  expect(__half2float(__float2half_rn(1.0f + 1.0f / 4096)) == 1.0f, "half rounds a tie to even (down)");
  expect(__half2float(__float2half_rn(1.0f + 3.0f / 4096)) == 1.0f + 4.0f / 4096, "half rounds a tie to even (up)");
  expect(__bfloat162float(__float2bfloat16_rn(1.0f + 1.0f / 256)) == 1.0f, "bfloat16 rounds a tie to even (down)");
  expect(__bfloat162float(__float2bfloat16_rn(1.0f + 3.0f / 256)) == 1.0f + 4.0f / 256, "bfloat16 rounds a tie to even (up)");
  expect(std::isnan(__bfloat162float(__float2bfloat16_rn(NAN))), "bfloat16 keeps NaN");
  expect(std::isinf(__half2float(__float2half_rn(1e6f))), "half overflows to inf");
}

void mistakes_raise_errors() {
  expect(mentions(error_of(dim3(1), 0, [] {
           if (threadIdx.x < 64) {
             __syncthreads();
           } else {
             __syncthreads();
           }
         }), "different __syncthreads call sites"),
         "divergent __syncthreads is an error");
  expect(mentions(error_of(dim3(1), 0, [] {
           if (threadIdx.x == 0) return;
           __syncthreads();
         }), "exited"),
         "__syncthreads after a thread exited is an error");
  expect(mentions(error_of(dim3(1), 0, [] {
           if (threadIdx.x % 32 < 16) __syncwarp();
         }), "exited"),
         "__syncwarp without the whole warp is an error");
  expect(mentions(error_of(dim3(1), 64, [] {
           __pipeline_memcpy_async(smem + 8, smem + 32, 16);
         }), "16-byte aligned"),
         "a misaligned cp.async is an error");
  expect(mentions(error_of(dim3(1), 0, [] {
           nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc;
           nvcuda::wmma::load_matrix_sync(acc, reinterpret_cast<const float*>(smem + 16), 16, nvcuda::wmma::mem_row_major);
         }), "32-byte aligned"),
         "a misaligned wmma load is an error");
  expect(mentions(error_of(dim3(1), mplug::kEmulatedSharedBytes + 1, [] {}), "shared memory"),
         "more shared memory than sm_90 has is an error");
  expect(mentions(error_of(dim3(1, 70000), 0, [] {}), "invalid grid"), "gridDim.y > 65535 is an error");
  expect(error_of(dim3(1), 0, [] { __syncthreads(); }).empty(), "the emulator recovers after errors");
}

}  // namespace

int main() {
  shuffles_reduce_and_broadcast();
  syncthreads_orders_shared_memory();
  if (std::getenv("MPLUG_KERNELS_EMULATOR_SCHEDULE") == nullptr) a_missing_syncthreads_shows_as_unwritten_shared_memory();
  every_block_runs_once_with_fresh_nan_shared_memory();
  async_copies_land_at_the_wait();
  wait_prior_keeps_the_newest_groups_pending();
  wmma_multiplies_like_float_math();
  atomics_add_up();
  half_and_bfloat16_round_to_nearest_even();
  mistakes_raise_errors();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
