// pybind11 module mplug_kernels._C: raw pointers, element strides and a stream handle in, no torch.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <tuple>

#include "attention.h"
#include "build_config.h"

namespace py = pybind11;

namespace {

// (data_ptr, stride_b, stride_s, stride_h) of a [B, S, H, D] tensor; (0, 0, 0, 0) when absent.
using View = std::tuple<uintptr_t, int64_t, int64_t, int64_t>;
// (k, v, mask data_ptr or 0, mask stride_b, length, dk, dv, key positions data_ptr or 0, their stride_b)
using Source = std::tuple<View, View, uintptr_t, int64_t, int64_t, View, View, uintptr_t, int64_t>;
// (query positions data_ptr or 0, their stride_b)
using Positions = std::tuple<uintptr_t, int64_t>;
// (batch, q_len, heads, head_dim); the K/V heads come separately (kv_heads, dividing heads)
using Shape = std::tuple<int64_t, int64_t, int64_t, int64_t>;

mplug::TensorView to_view(const View& view) {
  return mplug::TensorView{reinterpret_cast<void*>(std::get<0>(view)), std::get<1>(view), std::get<2>(view),
                           std::get<3>(view)};
}

mplug::ElementType to_dtype(const std::string& name) {
  if (name == "float16") return mplug::ElementType::float16;
  if (name == "bfloat16") return mplug::ElementType::bfloat16;
  throw std::invalid_argument("dtype must be 'float16' or 'bfloat16', got '" + name + "'");
}

mplug::AttentionArgs make_args(const std::string& dtype, const Shape& shape, double scale, const View& q,
                               const View& out, uintptr_t lse, const std::vector<Source>& sources, uintptr_t stream,
                               int64_t kv_heads, const Positions& query_positions) {
  if (sources.empty() || sources.size() > mplug::kMaxSources) {
    throw std::invalid_argument("sources must hold 1.." + std::to_string(mplug::kMaxSources) + " entries, got " +
                                std::to_string(sources.size()));
  }
  mplug::AttentionArgs args;
  args.dtype = to_dtype(dtype);
  std::tie(args.batch, args.q_len, args.heads, args.head_dim) = shape;
  args.kv_heads = kv_heads;
  args.scale = static_cast<float>(scale);
  args.q = to_view(q);
  args.out = to_view(out);
  args.lse = reinterpret_cast<float*>(lse);
  args.num_sources = static_cast<int>(sources.size());
  for (size_t s = 0; s < sources.size(); ++s) {
    const auto& [k, v, mask, mask_stride_b, length, dk, dv, positions, positions_stride_b] = sources[s];
    args.sources[s] = mplug::SourceView{to_view(k),  to_view(v), reinterpret_cast<const uint8_t*>(mask),
                                        mask_stride_b, length,   to_view(dk), to_view(dv),
                                        reinterpret_cast<const int32_t*>(positions), positions_stride_b};
  }
  args.query_positions = reinterpret_cast<const int32_t*>(std::get<0>(query_positions));
  args.query_positions_stride_b = std::get<1>(query_positions);
  args.stream = reinterpret_cast<void*>(stream);
  return args;
}

void forward(const std::string& dtype, const Shape& shape, double scale, const View& q, const View& out,
             uintptr_t lse, const std::vector<Source>& sources, int num_splits, int64_t split_size,
             uintptr_t part_out, uintptr_t part_lse, uintptr_t stream, int64_t kv_heads,
             const Positions& query_positions, uintptr_t key_tile_words) {
  mplug::AttentionArgs args = make_args(dtype, shape, scale, q, out, lse, sources, stream, kv_heads, query_positions);
  args.num_splits = num_splits;
  args.split_size = split_size;
  args.part_out = reinterpret_cast<float*>(part_out);
  args.part_lse = reinterpret_cast<float*>(part_lse);
  args.key_tile_words = reinterpret_cast<uint64_t*>(key_tile_words);
  mplug::attention_forward(args);
}

void backward(const std::string& dtype, const Shape& shape, double scale, const View& q, const View& out,
              uintptr_t lse, const std::vector<Source>& sources, const View& dout, const View& dq,
              uintptr_t dq_accum, uintptr_t dlse, uintptr_t delta, uintptr_t stream, int64_t kv_heads,
              const Positions& query_positions) {
  mplug::AttentionArgs args = make_args(dtype, shape, scale, q, out, lse, sources, stream, kv_heads, query_positions);
  args.dout = to_view(dout);
  args.dq = to_view(dq);
  args.dq_accum = reinterpret_cast<float*>(dq_accum);
  args.dlse = reinterpret_cast<const float*>(dlse);
  args.delta = reinterpret_cast<float*>(delta);
  mplug::attention_backward(args);
}

py::dict build_info() {
  py::dict info;
  info["platform"] = MPLUG_PLATFORM;
  info["archs"] = MPLUG_CUDA_ARCHS;
  info["nvcc"] = MPLUG_NVCC_VERSION;
  info["nvcc_path"] = MPLUG_NVCC_PATH;
  info["head_dims"] = mplug::supported_head_dims();
  info["dtypes"] = std::vector<std::string>{"float16", "bfloat16"};
  info["max_sources"] = mplug::kMaxSources;
  info["max_splits"] = mplug::kMaxSplits;
  info["kernels"] = mplug::kernel_names();
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "CUDA C++ attention kernels of mplug_kernels (layout [B, S, H, D], float16/bfloat16)";
  m.def("attention_forward", &forward, py::call_guard<py::gil_scoped_release>(), py::arg("dtype"), py::arg("shape"),
        py::arg("scale"), py::arg("q"), py::arg("out"), py::arg("lse"), py::arg("sources"), py::arg("num_splits"),
        py::arg("split_size"), py::arg("part_out"), py::arg("part_lse"), py::arg("stream"), py::arg("kv_heads") = 0,
        py::arg("query_positions") = Positions{0, 0}, py::arg("key_tile_words") = 0,
        "out [B, Lq, H, D] and lse [B, H, Lq] of q over the concatenated sources [B, Lk_i, kv_heads, D] (split-KV "
        "when num_splits > 1; kv_heads 0 means H; query_positions (data_ptr, stride_b) of int32 [B, Lq]: key j of "
        "a source with positions is visible to query m iff its position <= the query's; key_tile_words: an int64 "
        "[B, ceil(keys / 64)] workspace, needed with masks and without positions)");
  m.def("attention_backward", &backward, py::call_guard<py::gil_scoped_release>(), py::arg("dtype"),
        py::arg("shape"), py::arg("scale"), py::arg("q"), py::arg("out"), py::arg("lse"), py::arg("sources"),
        py::arg("dout"), py::arg("dq"), py::arg("dq_accum"), py::arg("dlse"), py::arg("delta"), py::arg("stream"),
        py::arg("kv_heads") = 0, py::arg("query_positions") = Positions{0, 0},
        "dq, and every source's dk and dv (summed over each K/V head's query heads); dQ by atomics into dq_accum "
        "when it is set, else deterministic");
  m.def(
      "forward_launch",
      [](const std::string& dtype, int64_t head_dim, int64_t q_len) {
        return std::make_tuple(mplug::forward_rows_per_cta(head_dim, q_len),
                               mplug::forward_ctas_per_sm(to_dtype(dtype), head_dim, q_len));
      },
      py::arg("dtype"), py::arg("head_dim"), py::arg("q_len"),
      "(query rows per CTA, CTAs per multiprocessor) of the forward kernel for these inputs on the current device");
  m.def("build_info", &build_info, "archs, nvcc version, head dims, dtypes and kernel names compiled in");
  m.attr("KEYS_PER_TILE") = mplug::kKeysPerTile;
}
