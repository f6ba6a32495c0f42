// The steps of a batch-1..n decoder layer over packed linears, one call each from Python instead of 3-5 ops and
// modules (at 4-bit weights the dispatch between ops is a large part of a decode step); a format that quantizes
// activations quantizes each linear's input first, as its module does:
//   norm_linear: linear(rms_norm(x))                  (q/k/v; RoPE and the KV write stay in Python)
//   linear_add:  residual + linear(x)                 (the attention output projection)
//   mlp_add:     x + down(silu(gate) * up)(rms_norm(x))
// Each is the composition of the same kernels the modules call (rms_norm and silu_mul from rowwise.cpp, the packed
// matmul) and the same fp32 elementwise products and sums, so it gives the module path's results bit for bit.
#include <torch/extension.h>

#include "ops.h"
#include "packed_ops.h"

// x [..., K] (times the pre-quant scale, then quantized as the format's activations) @ W.T + b.
static at::Tensor apply(const PackedWeight& w, const at::Tensor& x) {
  at::Tensor in = w.pre_scale ? x * *w.pre_scale : x;
  return packed_linear(w.format, in, w.codes, w.scales, w.tensor_scales, w.bias, w.group, w.act_format, w.act_scale);
}

at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& norm, double eps, const PackedWeight& w) {
  return apply(w, rms_norm(x, norm, eps));
}

at::Tensor linear_add(const PackedWeight& w, const at::Tensor& x, const at::Tensor& residual) {
  return residual + apply(w, x);
}

at::Tensor mlp_add(const at::Tensor& x, const at::Tensor& norm, double eps, const PackedWeight& gate_up,
                   const PackedWeight& down) {
  return x + apply(down, silu_mul(apply(gate_up, rms_norm(x, norm, eps))));
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("packed_linear", &packed_linear,
          "x @ W.T (+ bias) straight from packed NVFP4 / INT4 / INT8 / FP8 / BF16 shards (format 0..4)");
  using Tensors = std::vector<at::Tensor>;
  using MaybeTensor = std::optional<at::Tensor>;
  // Module-local: a build for another CPU (the AVX2 test) loads beside this one. Pickled as its fields, so
  // `copy.deepcopy` of a model (`model.with_layers`) shares or copies its tensors as it does the layer's own.
  py::class_<PackedWeight>(mod, "PackedWeight", py::module_local())
      .def(py::init<int64_t, Tensors, Tensors, std::vector<double>, MaybeTensor, MaybeTensor, int64_t, int64_t,
                    double>())
      .def(py::pickle(
          [](const PackedWeight& w) {
            return py::make_tuple(w.format, w.codes, w.scales, w.tensor_scales, w.bias, w.pre_scale, w.group,
                                  w.act_format, w.act_scale);
          },
          [](const py::tuple& t) {
            return PackedWeight{t[0].cast<int64_t>(), t[1].cast<Tensors>(), t[2].cast<Tensors>(),
                                t[3].cast<std::vector<double>>(), t[4].cast<MaybeTensor>(), t[5].cast<MaybeTensor>(),
                                t[6].cast<int64_t>(), t[7].cast<int64_t>(), t[8].cast<double>()};
          }));
  mod.def("fake_quant_activations", &fake_quant_activations,
          "x quantized-dequantized as NVFP4 / INT8 / FP8 activations (format 0 / 2 / 3) with a per-tensor scale, or "
          "as W4A8's int8 per 128-group (5)");
  mod.def("int8_integer_path", &int8_integer_path, "whether INT8 W8A8 runs as integer sums (AVX512-VNNI or AVX2) here");
  mod.def("norm_linear", &norm_linear, "linear(rms_norm(x))");
  mod.def("linear_add", &linear_add, "residual + linear(x)");
  mod.def("mlp_add", &mlp_add, "x + down(silu(gate) * up) of rms_norm(x)");
}
