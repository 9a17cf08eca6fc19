// Launch probe of bench.static: links the real csrc/ launchers (nvcc objects) against a stand-in for the
// few CUDA runtime entry points they use, calls every launcher entry of csrc/launchers.h over a grid of
// shapes and prints one line per kernel launch: entry, scenario, the device function's mangled name,
// grid, block and dynamic shared memory. Nothing runs on a GPU; no GPU or driver is needed.
#include <cuda_runtime.h>

#include <cstdio>
#include <exception>
#include <map>
#include <string>
#include <vector>

#include "attention.h"
#include "launchers.h"

namespace {

std::map<const void*, std::string>& device_names() {
  static std::map<const void*, std::string> names;
  return names;
}

std::map<const void*, int>& max_dynamic_shared() {
  static std::map<const void*, int> limits;
  return limits;
}

struct CallConfiguration {
  dim3 grid, block;
  size_t shared_bytes;
  void* stream;
};

std::vector<CallConfiguration> pending;
std::string scenario = "none";

}  // namespace

extern "C" {

void** __cudaRegisterFatBinary(void* fat_cubin) { return static_cast<void**>(fat_cubin); }
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}

void __cudaRegisterFunction(void**, const char* host_function, char* device_function, const char*, int, uint3*,
                            uint3*, dim3*, dim3*, int*) {
  device_names()[host_function] = device_function;
}

unsigned __cudaPushCallConfiguration(dim3 grid, dim3 block, size_t shared_bytes, struct CUstream_st* stream) {
  pending.push_back({grid, block, shared_bytes, stream});
  return 0;
}

cudaError_t __cudaPopCallConfiguration(dim3* grid, dim3* block, size_t* shared_bytes, void* stream) {
  if (pending.empty()) return cudaErrorInvalidConfiguration;
  *grid = pending.back().grid;
  *block = pending.back().block;
  *shared_bytes = pending.back().shared_bytes;
  *static_cast<void**>(stream) = pending.back().stream;
  pending.pop_back();
  return cudaSuccess;
}

cudaError_t __cudaGetKernel(cudaKernel_t* kernel, const void* host_function) {
  *kernel = reinterpret_cast<cudaKernel_t>(const_cast<void*>(host_function));
  return cudaSuccess;
}

cudaError_t __cudaLaunchKernel(cudaKernel_t kernel, dim3 grid, dim3 block, void**, size_t shared_bytes, cudaStream_t) {
  const void* host_function = reinterpret_cast<const void*>(kernel);
  const auto name = device_names().find(host_function);
  const auto limit = max_dynamic_shared().find(host_function);
  std::printf("launch\t%s\t%s\t%u %u %u\t%u %u %u\t%zu\t%d\n", scenario.c_str(),
              name == device_names().end() ? "?" : name->second.c_str(), grid.x, grid.y, grid.z, block.x, block.y,
              block.z, shared_bytes, limit == max_dynamic_shared().end() ? -1 : limit->second);
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* function, cudaFuncAttribute attribute, int value) {
  if (attribute == cudaFuncAttributeMaxDynamicSharedMemorySize) max_dynamic_shared()[function] = value;
  return cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaPeekAtLastError() { return cudaSuccess; }
const char* cudaGetErrorName(cudaError_t) { return "probe"; }
const char* cudaGetErrorString(cudaError_t) { return "no GPU: launch probe"; }
cudaError_t cudaMemsetAsync(void*, int, size_t, cudaStream_t) { return cudaSuccess; }

// Linked by the launchers' occupancy queries; the probe never calls them (no device to ask).
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* ctas, const void*, int, size_t, unsigned) {
  *ctas = 0;
  return cudaErrorNoDevice;
}

}  // extern "C"

namespace {

using mplug::AttentionArgs;
using mplug::ElementType;
using mplug::TensorView;

alignas(256) unsigned char dummy[256];

// A contiguous [B, S, H, D] view over the dummy buffer (nothing is read or written).
TensorView view(int64_t length, const AttentionArgs& args) {
  return {dummy, length * args.heads * args.head_dim, args.heads * args.head_dim, args.head_dim};
}

struct Shape {
  int64_t q_len;
  std::vector<int64_t> source_lengths;
  bool masks;
  bool positions = false;  // key positions on every source and query positions (the positional kernels)
};

AttentionArgs make_args(ElementType dtype, int head_dim, const Shape& shape) {
  AttentionArgs args;
  args.dtype = dtype;
  args.batch = 2;
  args.heads = 2;
  args.q_len = shape.q_len;
  args.head_dim = head_dim;
  args.scale = 0.125f;
  args.q = args.out = args.dout = args.dq = view(shape.q_len, args);
  args.lse = args.delta = reinterpret_cast<float*>(dummy);
  args.num_sources = static_cast<int>(shape.source_lengths.size());
  for (int i = 0; i < args.num_sources; ++i) {
    const int64_t length = shape.source_lengths[i];
    auto& source = args.sources[i];
    source.k = source.v = source.dk = source.dv = view(length, args);
    source.length = length;
    source.mask = shape.masks ? dummy : nullptr;
    source.mask_stride_b = shape.masks ? length : 0;
    source.positions = shape.positions ? reinterpret_cast<const int32_t*>(dummy) : nullptr;
  }
  args.query_positions = shape.positions ? reinterpret_cast<const int32_t*>(dummy) : nullptr;
  args.key_tile_words = shape.masks ? reinterpret_cast<uint64_t*>(dummy) : nullptr;
  return args;
}

int64_t total_keys(const Shape& shape) {
  int64_t total = 0;
  for (int64_t length : shape.source_lengths) total += length;
  return total;
}

template <typename Launcher>
void probe(const char* entry, Launcher launcher, const AttentionArgs& args, const std::string& details) {
  scenario = std::string(entry) + "\t" + std::to_string(args.head_dim) + "\t" + details;
  try {
    launcher(args);
  } catch (const std::exception& error) {
    std::printf("error\t%s\t%s\n", scenario.c_str(), error.what());
  }
}

void probe_dtype(ElementType dtype, const char* name, void (*forward)(const AttentionArgs&),
                 void (*backward)(const AttentionArgs&), int head_dim) {
  const std::vector<Shape> shapes = {{1, {577}, false}, {25, {577}, true},   {25, {577, 25}, true},
                                     {80, {257}, false}, {602, {577, 25}, true}, {602, {1025}, false},
                                     {25, {577, 25}, true, true}, {602, {577, 25}, true, true}};
  for (const Shape& shape : shapes) {
    const std::string details = std::string(name) + " q_len=" + std::to_string(shape.q_len) +
                                " keys=" + std::to_string(total_keys(shape)) +
                                " sources=" + std::to_string(shape.source_lengths.size()) +
                                (shape.masks ? " masks" : "") + (shape.positions ? " positions" : "");
    for (int splits : {1, 3}) {
      AttentionArgs args = make_args(dtype, head_dim, shape);
      args.num_splits = splits;
      args.split_size = (total_keys(shape) + splits * 128 - 1) / (splits * 128) * 128;
      args.part_out = args.part_lse = reinterpret_cast<float*>(dummy);
      probe("forward", forward, args, details + " splits=" + std::to_string(splits));
    }
    for (bool atomic_dq : {false, true}) {
      for (bool with_dlse : {false, true}) {
        AttentionArgs args = make_args(dtype, head_dim, shape);
        args.dq_accum = atomic_dq ? reinterpret_cast<float*>(dummy) : nullptr;
        args.dlse = with_dlse ? reinterpret_cast<const float*>(dummy) : nullptr;
        probe("backward", backward, args,
              details + (atomic_dq ? " dq=atomic" : " dq=deterministic") + (with_dlse ? " dlse" : ""));
      }
    }
  }
}

template <int... Ds>
void probe_all(std::integer_sequence<int, Ds...>) {
  (probe_dtype(ElementType::float16, "float16", mplug::forward_float16, mplug::backward_float16, Ds), ...);
  (probe_dtype(ElementType::bfloat16, "bfloat16", mplug::forward_bfloat16, mplug::backward_bfloat16, Ds), ...);
}

}  // namespace

int main() {
  probe_all(mplug::SupportedHeadDims{});
  return 0;
}
