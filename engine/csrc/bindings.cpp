#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ weight_t (+ bias), weight_t the transpose of a row-major [out, in]");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for [..., 2I] = [gate | up]");
  m.def("rope_", &rope_, "in-place RoPE on interleaved pairs");
  m.def("decode_attention", &decode_attention, "a few query rows per sequence over the paged KV cache");
}
