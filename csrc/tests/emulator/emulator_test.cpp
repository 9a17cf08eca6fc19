// Self-test of the CPU emulator (cpu_platform.h): the CUDA features the kernels use behave as on a
// GPU, and the mistakes it promises to catch raise errors. Exit status 0 when every check passes.
#include <cstdio>
#include <random>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define MPLUG_PLATFORM_HEADER "cpu_platform.h"
#include "mma.cuh"

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

uint16_t bits_of(float x, __half) { return __float2half_rn(x).bits; }
uint16_t bits_of(float x, __nv_bfloat16) { return __float2bfloat16_rn(x).bits; }
float value_of(uint16_t bits, __half) { return __half2float(__half{bits}); }
float value_of(uint16_t bits, __nv_bfloat16) { return __bfloat162float(__nv_bfloat16{bits}); }

template <typename T>
std::vector<uint16_t> random_elements(size_t count, std::mt19937& random) {
  std::normal_distribution<float> normal;
  std::vector<uint16_t> values(count);
  for (auto& x : values) x = bits_of(normal(random), T{});
  return values;
}

uint32_t two(uint16_t lo, uint16_t hi) { return lo | static_cast<uint32_t>(hi) << 16; }

// mma_m16n8k16 with fragments built by the PTX ISA's layout formulas (g = lane / 4, t = lane % 4)
// from random A [16, 16], B [16, 8] and C [16, 8] equals C + A B computed in double.
template <typename T>
void mma_multiplies_like_a_matmul(const char* type) {
  std::mt19937 random(11);
  const std::vector<uint16_t> a = random_elements<T>(16 * 16, random), b = random_elements<T>(16 * 8, random);
  std::vector<float> c(16 * 8), d(16 * 8, NAN);
  std::normal_distribution<float> normal;
  for (auto& x : c) x = normal(random);
  const std::string error = error_of(dim3(1), 0, [&] {
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    uint32_t a_frag[4], b_frag[2];
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i % 2), col = 2 * t + 8 * (i / 2);
      a_frag[i] = two(a[row * 16 + col], a[row * 16 + col + 1]);
    }
    for (int i = 0; i < 2; ++i) b_frag[i] = two(b[(2 * t + 8 * i) * 8 + g], b[(2 * t + 8 * i + 1) * 8 + g]);
    float acc[4];
    for (int i = 0; i < 4; ++i) acc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
    mplug::mma_m16n8k16<T>(acc, a_frag, b_frag);
    if (warp == 1) {
      for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = acc[i];
    }
  });
  expect(error.empty(), std::string("mma kernel ran: ") + error);
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 8; ++j) {
      double expected = c[i * 8 + j];
      for (int k = 0; k < 16; ++k) expected += double(value_of(a[i * 16 + k], T{})) * value_of(b[k * 8 + j], T{});
      expect(std::fabs(d[i * 8 + j] - expected) < 1e-5 * (1.0 + std::fabs(expected)),
             std::string("mma ") + type + " element (" + std::to_string(i) + ", " + std::to_string(j) + ")");
    }
  }
}

// ldmatrix x1/x2/x4, plain and .trans: N random 8x8 matrices stored at scattered 16-byte rows of
// shared memory; lane 8i + r passes row r of matrix i; each register holds the documented elements.
template <int N, bool kTrans>
void ldmatrix_loads_documented_elements() {
  std::mt19937 random(5 + N + kTrans);
  const std::vector<uint16_t> m = random_elements<__half>(N * 64, random);  // m[(i * 8 + r) * 8 + c]
  std::vector<uint32_t> got(kThreadsPerBlock * N, 0);
  // row r of matrix i lives at 16-byte slot (37 * (8 i + r) + 3) % 64 of shared memory
  auto slot = [](int i, int r) { return (37 * (8 * i + r) + 3) % 64; };
  const std::string error = error_of(dim3(1), 64 * 16, [&] {
    auto* rows = reinterpret_cast<uint16_t*>(smem);
    if (threadIdx.x == 0) {
      for (int i = 0; i < N; ++i) {
        for (int r = 0; r < 8; ++r) std::memcpy(rows + 8 * slot(i, r), &m[(i * 8 + r) * 8], 16);
      }
    }
    __syncthreads();
    const int lane = threadIdx.x % 32;
    // lanes past 8N pass an address ldmatrix must ignore
    const void* address = lane < 8 * N ? static_cast<const void*>(rows + 8 * slot(lane / 8, lane % 8)) : nullptr;
    uint32_t regs[N];
    if constexpr (kTrans) {
      mplug::ldmatrix_trans<N>(regs, address);
    } else {
      mplug::ldmatrix<N>(regs, address);
    }
    for (int i = 0; i < N; ++i) got[threadIdx.x * N + i] = regs[i];
  });
  const std::string what = "ldmatrix x" + std::to_string(N) + (kTrans ? ".trans" : "");
  expect(error.empty(), what + " ran: " + error);
  for (int thread = 0; thread < kThreadsPerBlock; ++thread) {
    const int lane = thread % 32;
    for (int i = 0; i < N; ++i) {
      // plain: row lane / 4, columns 2 (lane % 4) + {0, 1}; .trans: the transposed matrix's
      auto at = [&](int r, int c) { return kTrans ? m[(i * 8 + c) * 8 + r] : m[(i * 8 + r) * 8 + c]; };
      const uint32_t expected = two(at(lane / 4, 2 * (lane % 4)), at(lane / 4, 2 * (lane % 4) + 1));
      expect(got[thread * N + i] == expected, what + " register " + std::to_string(i) + " of lane " + std::to_string(lane));
    }
  }
}

// The kernels' path: A [16, 32] and B^T [16, 32] (keys as rows, as K) and V [16, 16] stored in
// swizzled shared memory, read with ldmatrix x4 (A and .trans V at x4_row/x4_col, K at x4_row_b/x4_col_b), multiplied by
// mma_m16n8k16 and packed with pack_b16x2, equal (A B) V computed in double within rounding.
template <typename T>
void swizzled_ldmatrix_and_mma_compute_a_matmul(const char* type) {
  constexpr int D = 32;
  std::mt19937 random(17);
  const std::vector<uint16_t> a = random_elements<T>(16 * D, random), k = random_elements<T>(16 * D, random),
                              v = random_elements<T>(16 * 16, random);
  std::vector<float> out(16 * 16, NAN);
  const std::string error = error_of(dim3(1), 3 * 16 * D * 2, [&] {
    unsigned char* tiles = smem;  // a, k: [16, D] swizzled; v: [16, 16] swizzled
    if (threadIdx.x == 0) {
      for (int r = 0; r < 16; ++r) {
        for (int c = 0; c < D; ++c) {
          std::memcpy(tiles + mplug::swizzled_offset<D>(r, c), &a[r * D + c], 2);
          std::memcpy(tiles + 16 * D * 2 + mplug::swizzled_offset<D>(r, c), &k[r * D + c], 2);
        }
        for (int c = 0; c < 16; ++c) std::memcpy(tiles + 2 * 16 * D * 2 + mplug::swizzled_offset<16>(r, c), &v[r * 16 + c], 2);
      }
    }
    __syncthreads();
    const int lane = threadIdx.x % 32;
    float s[2][4] = {};  // S = A K^T: keys 0-7 and 8-15
    for (int k0 = 0; k0 < D; k0 += 16) {
      uint32_t a_frag[4], k_frag[4];
      mplug::ldmatrix<4>(a_frag, tiles + mplug::swizzled_offset<D>(mplug::x4_row(lane), k0 + mplug::x4_col(lane)));
      mplug::ldmatrix<4>(k_frag, tiles + 16 * D * 2 + mplug::swizzled_offset<D>(mplug::x4_row_b(lane), k0 + mplug::x4_col_b(lane)));
      mplug::mma_m16n8k16<T>(s[0], a_frag, {k_frag[0], k_frag[1]});
      mplug::mma_m16n8k16<T>(s[1], a_frag, {k_frag[2], k_frag[3]});
    }
    const uint32_t p[4] = {mplug::pack_b16x2<T>(s[0][0], s[0][1]), mplug::pack_b16x2<T>(s[0][2], s[0][3]),
                           mplug::pack_b16x2<T>(s[1][0], s[1][1]), mplug::pack_b16x2<T>(s[1][2], s[1][3])};
    uint32_t v_frag[4];
    mplug::ldmatrix_trans<4>(v_frag, tiles + 2 * 16 * D * 2 + mplug::swizzled_offset<16>(mplug::x4_row(lane), mplug::x4_col(lane)));
    float o[2][4] = {};
    mplug::mma_m16n8k16<T>(o[0], p, {v_frag[0], v_frag[1]});
    mplug::mma_m16n8k16<T>(o[1], p, {v_frag[2], v_frag[3]});
    if (threadIdx.x < 32) {
      for (int n = 0; n < 2; ++n) {
        for (int i = 0; i < 4; ++i) out[mplug::acc_row(lane, i) * 16 + 8 * n + mplug::acc_col(lane, i)] = o[n][i];
      }
    }
  });
  expect(error.empty(), std::string("swizzled ldmatrix + mma kernel ran: ") + error);
  double s[16][16];
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      s[i][j] = 0.0;
      for (int c = 0; c < D; ++c) s[i][j] += double(value_of(a[i * D + c], T{})) * value_of(k[j * D + c], T{});
    }
  }
  for (int i = 0; i < 16; ++i) {
    for (int j = 0; j < 16; ++j) {
      double expected = 0.0, magnitude = 0.0;
      for (int n = 0; n < 16; ++n) {
        expected += s[i][n] * value_of(v[n * 16 + j], T{});
        magnitude += std::fabs(s[i][n] * value_of(v[n * 16 + j], T{}));
      }
      // P is rounded to T once: relative error <= 2^-8 (bfloat16) of the magnitude
      expect(std::fabs(out[i * 16 + j] - expected) <= 1e-2 * magnitude + 1e-5,
             std::string("(A K^T) V ") + type + " element (" + std::to_string(i) + ", " + std::to_string(j) + ")");
    }
  }
}

void swizzle_is_a_bijection_on_16_byte_chunks() {
  auto check = [](auto head_dim) {
    constexpr int D = decltype(head_dim)::value;
    std::vector<int> seen(64 * D / 8, 0);
    bool conflict_free = true;
    for (int r = 0; r < 64; ++r) {
      for (int c = 0; c < D; c += 8) {
        const uint32_t offset = mplug::swizzled_offset<D>(r, c);
        if (offset % 16 == 0 && offset / 16 < seen.size()) ++seen[offset / 16];
      }
    }
    for (int r0 = 0; r0 < 64; r0 += 8) {
      for (int c = 0; c < D; c += 8) {
        int groups = 0;
        for (int r = r0; r < r0 + 8; ++r) groups |= 1 << (mplug::swizzled_offset<D>(r, c) / 16 % 8);
        conflict_free = conflict_free && groups == 0xff;
      }
    }
    bool once = true;
    for (int count : seen) once = once && count == 1;
    expect(once, "swizzle maps the 16-byte chunks of a [64, " + std::to_string(D) + "] tile one to one");
    expect(conflict_free, "ldmatrix rows of a swizzled [64, " + std::to_string(D) + "] tile hit 8 bank groups");
  };
  check(mplug::HeadDim<32>{});
  check(mplug::HeadDim<64>{});
  check(mplug::HeadDim<80>{});
  check(mplug::HeadDim<96>{});
  check(mplug::HeadDim<128>{});
}

void concurrent_launches_from_host_threads() {
  std::vector<std::thread> threads;
  std::vector<std::string> errors(4);
  std::vector<float> sums(4 * kThreadsPerBlock);
  for (int h = 0; h < 4; ++h) {
    threads.emplace_back([&, h] {
      errors[h] = error_of(dim3(3), kThreadsPerBlock * sizeof(float), [&] {
        float* slots = reinterpret_cast<float*>(smem);
        slots[threadIdx.x] = static_cast<float>(h);
        __syncthreads();
        float x = slots[(threadIdx.x + 32) % kThreadsPerBlock];
        for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffffu, x, offset);
        if (blockIdx.x == 2) sums[h * kThreadsPerBlock + threadIdx.x] = x;
      });
    });
  }
  for (auto& thread : threads) thread.join();
  for (int h = 0; h < 4; ++h) {
    expect(errors[h].empty(), "concurrent launch ran: " + errors[h]);
    for (int t = 0; t < kThreadsPerBlock; ++t) expect(sums[h * kThreadsPerBlock + t] == 32.0f * h, "concurrent launch result");
  }
}

void syncthreads_and_reduces_a_predicate() {
  std::vector<int> all_true(kThreadsPerBlock), one_false(kThreadsPerBlock);
  const std::string error = error_of(dim3(1), 0, [&] {
    all_true[threadIdx.x] = __syncthreads_and(1);
    one_false[threadIdx.x] = __syncthreads_and(threadIdx.x != 77);
  });
  expect(error.empty(), "__syncthreads_and ran: " + error);
  for (int t = 0; t < kThreadsPerBlock; ++t) {
    expect(all_true[t] == 1 && one_false[t] == 0, "__syncthreads_and is the AND over the block, in every thread");
  }
}

void syncthreads_count_counts_a_predicate() {
  std::vector<int> none(kThreadsPerBlock), some(kThreadsPerBlock);
  const std::string error = error_of(dim3(1), 0, [&] {
    none[threadIdx.x] = __syncthreads_count(0);
    some[threadIdx.x] = __syncthreads_count(threadIdx.x % 3 == 0);
  });
  expect(error.empty(), "__syncthreads_count ran: " + error);
  for (int t = 0; t < kThreadsPerBlock; ++t) {
    expect(none[t] == 0 && some[t] == (kThreadsPerBlock + 2) / 3, "__syncthreads_count counts over the block");
  }
}

void exp2_approx_flushes_like_ex2_approx_ftz() {
  expect(mplug::exp2_approx(3.0f) == 8.0f && mplug::exp2_approx(-INFINITY) == 0.0f, "exp2_approx of 3 and -inf");
  expect(mplug::exp2_approx(-130.0f) == 0.0f, "a denormal result flushes to zero");
  expect(std::isnan(mplug::exp2_approx(NAN)), "exp2_approx keeps NaN");
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
  expect(mentions(error_of(dim3(1), 64, [] {
           uint32_t regs[1];
           mplug::ldmatrix<1>(regs, smem + 8);
         }), "16-byte aligned"),
         "a misaligned ldmatrix row is an error");
  expect(mentions(error_of(dim3(1), 0, [] {
           alignas(16) static uint16_t global[64];
           uint32_t regs[2];
           mplug::ldmatrix_trans<2>(regs, global + 8 * (threadIdx.x % 8));
         }), "not in shared memory"),
         "ldmatrix from outside shared memory is an error");
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
  mma_multiplies_like_a_matmul<__half>("float16");
  mma_multiplies_like_a_matmul<__nv_bfloat16>("bfloat16");
  ldmatrix_loads_documented_elements<1, false>();
  ldmatrix_loads_documented_elements<2, false>();
  ldmatrix_loads_documented_elements<4, false>();
  ldmatrix_loads_documented_elements<1, true>();
  ldmatrix_loads_documented_elements<2, true>();
  ldmatrix_loads_documented_elements<4, true>();
  swizzle_is_a_bijection_on_16_byte_chunks();
  swizzled_ldmatrix_and_mma_compute_a_matmul<__half>("float16");
  swizzled_ldmatrix_and_mma_compute_a_matmul<__nv_bfloat16>("bfloat16");
  concurrent_launches_from_host_threads();
  syncthreads_and_reduces_a_predicate();
  syncthreads_count_counts_a_predicate();
  exp2_approx_flushes_like_ex2_approx_ftz();
  atomics_add_up();
  half_and_bfloat16_round_to_nearest_even();
  mistakes_raise_errors();
  std::printf("%s: %d failure(s)\n", failures ? "FAILED" : "ok", failures);
  return failures ? 1 : 0;
}
