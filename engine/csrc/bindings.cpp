#include <torch/extension.h>

#include "ops.h"

// Every kernel runs without the GIL (as ATen's ops do): while the engine thread computes a step, the server's event
// loop streams the last step's tokens instead of waiting for the forward to end.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("linear", &linear, no_gil, "x @ weight_t (+ bias), weight_t the transpose of a row-major [out, in]");
  m.def("rms_norm", &rms_norm, no_gil, "RMSNorm over the last dim");
  m.def("silu_mul", &silu_mul, no_gil, "silu(gate) * up for [..., 2I] = [gate | up]");
  m.def("rope_", &rope_, no_gil, "in-place RoPE on interleaved pairs");
  m.def("decode_attention", &decode_attention, no_gil, "a few query rows per sequence over the paged KV cache");
  m.def("decode_attention_packed", &decode_attention_packed, no_gil, "decode_attention over FP8 / NVFP4 KV pools");
  m.def("kv_store", &kv_store, no_gil, "copy K and V rows into unquantized fp32 KV pools");
  m.def("kv_write", &kv_write, no_gil, "encode K or V rows straight into FP8 / NVFP4 KV pools");
}
