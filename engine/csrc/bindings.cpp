#include <torch/extension.h>

#include "ops.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("linear", &linear, "x @ weight_t (+ bias), weight_t the transpose of a row-major [out, in]");
  m.def("rms_norm", &rms_norm, "RMSNorm over the last dim");
  m.def("silu_mul", &silu_mul, "silu(gate) * up for [..., 2I] = [gate | up]");
  m.def("rope_", &rope_, "in-place RoPE on interleaved pairs");
  m.def("decode_attention", &decode_attention, "a few query rows per sequence over the paged KV cache");
  m.def("decode_attention_packed", &decode_attention_packed, "decode_attention over FP8 / NVFP4 KV pools");
  m.def("kv_store", &kv_store, "copy K and V rows into unquantized fp32 KV pools");
  m.def("kv_write", &kv_write, "encode K or V rows straight into FP8 / NVFP4 KV pools");
}
