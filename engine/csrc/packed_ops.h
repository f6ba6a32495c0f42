// What the packed-weight extension exports (packed_layer.cpp binds it): the matmul from packed shards and the fused
// steps of a decoder layer built on it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

// `act_format` -1: x as it is; else x is first quantized as that format's activations with `act_scale`. `pre_scale`
// [k] (SmoothQuant, AWQ): x is multiplied by it first.
at::Tensor packed_linear(int64_t format, const at::Tensor& x, const std::vector<at::Tensor>& codes,
                         const std::vector<at::Tensor>& scales, const std::vector<double>& tensor_scales,
                         const std::optional<at::Tensor>& bias, int64_t group, int64_t act_format, double act_scale,
                         const std::optional<at::Tensor>& pre_scale, const std::vector<at::Tensor>& gemm);

// INT8 W8A8 as exact integer sums (int8_linear.cpp), where this build has AVX512-VNNI or AVX2; `gemm`, the layer's
// codes packed once for oneDNN's GEMM (`int8_gemm_pack`: empty where the build would not use it), takes many rows.
bool int8_integer_path();
std::vector<at::Tensor> int8_gemm_pack(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales);
at::Tensor int8_integer_linear(const at::Tensor& x, double act_scale, const std::vector<at::Tensor>& codes,
                               const std::vector<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& pre_scale, const std::vector<at::Tensor>& gemm);

// AMX-INT8 tiles (int8_amx.cpp), where this build and the OS allow them: S[i * out_stride + r] = the exact sum over
// t < k of A[i, t] * W[r, t] for i < m, r < n; A int8 [m rounded up to 16, kp] (zeros past k), kp = k rounded up to
// 64; W int8 [n, k].
bool amx_int8_available();
// From this many input rows on, the INT8 and W4A8 kernels take AMX tiles: one tile pass reads each weight once for
// all rows but regroups it into the tile layout on every call; the one-row kernels skip the regrouping (crossovers
// in the README).
constexpr int64_t AMX_MIN_ROWS_INT8 = 12;
constexpr int64_t AMX_MIN_ROWS_W4A8 = 8;
void amx_int8_sums(const int8_t* A, int64_t m, int64_t kp, const int8_t* W, int64_t n, int64_t k, int32_t* S,
                   int64_t out_stride);
// INT4 W4A8 on the same tiles: Y[i * ldy + o] for rows i < m and outputs o < 2 pairs, exactly as int4_w4a8.cpp's
// one-row kernel computes them (exact sums per 128-group, then its epilogue in its order); A the int8 codes
// [m rounded up to 16, ldq] (ldq = k rounded up to 64, zeros past k), xs their scales [m, groups], W the packed pairs
// [pairs, k], ws the weight scales [2 pairs, groups], b the bias or null.
constexpr int64_t W4A8_GROUP = 128;  // INT4's group: the weight scales and the activation scales share it
void amx_w4a8(const int8_t* A, int64_t m, int64_t ldq, const float* xs, int64_t groups, const uint8_t* W,
              int64_t pairs, int64_t k, const float* ws, const float* b, float* Y, int64_t ldy);

// INT4 weights x int8 activations per row and 128-group, as exact integer sums per group (int4_w4a8.cpp): what
// `packed_linear` runs for INT4 weights with `act_format` ACT_INT8_GROUPS.
constexpr int64_t ACT_INT8_GROUPS = 5;
at::Tensor int4_w4a8_linear(const at::Tensor& x, const std::vector<at::Tensor>& codes,
                            const std::vector<at::Tensor>& scales, const std::optional<at::Tensor>& bias);
at::Tensor int8_group_fake_quant(const at::Tensor& x);

// x [..., K] fp32 -> the values a format that quantizes activations multiplies (activations.cpp).
at::Tensor fake_quant_activations(int64_t format, const at::Tensor& x, double scale);

// One linear layer as the kernel computes it, gathered once: its shards, bias, the `pre_quant_scale` (AWQ,
// SmoothQuant) its input is multiplied by first, and how that input is then quantized (`act_format`: -1 not at
// all, else the `fake_quant_activations` format, with the per-tensor `act_scale`).
struct PackedWeight {
  int64_t format;
  std::vector<at::Tensor> codes, scales;
  std::vector<double> tensor_scales;
  std::optional<at::Tensor> bias, pre_scale;
  int64_t group;
  int64_t act_format;
  double act_scale;
  std::vector<at::Tensor> gemm;  // INT8: `int8_gemm_pack`'s copy of the codes, or empty
};
