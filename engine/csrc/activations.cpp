// The activation quantizers of the formats that quantize a linear's input (W4A4 NVFP4, W8A8 INT8, FP8; W4A8's
// int8 groups are in int4_w4a8.cpp): x [..., K]
// fp32 -> the fp32 values the format's matmul multiplies, bit for bit those of the references in kernels/
// (quantize then dequantize: `quantize_nvfp4_reference`, `quantize_int8_reference`, `quantize_fp8_reference` and
// their dequantizers), in one pass where the references take ~20 ATen ops: at batch 1 those ops cost more than
// the packed matmul they feed. `scale` is the calibrated per-tensor `input_scale` (NVFP4: the global scale s2).
#include <ATen/Parallel.h>

#include "encode.h"
#include "packed_decode.h"
#include "packed_ops.h"

// One row of NVFP4: per 16-element block (the last zero-padded) the E4M3 scale of amax / (6 * s2) (1 for an
// all-zero block), clamped to [2^-9, 448]; each value -> e2m1(x / step) * step, step = scale * s2.
static void nvfp4_row(const float* x, int64_t k, float s2, float* y) {
  const float divisor = 6.0f * s2;
  for (int64_t b0 = 0; b0 < k; b0 += 16) {
    const int64_t n = std::min<int64_t>(16, k - b0);
    float amax = 0.0f;
    for (int64_t j = 0; j < n; j++) {
      float a = std::fabs(x[b0 + j]);
      if (a > amax || std::isnan(a)) amax = a;  // NaN propagates, as amax does
    }
    const float raw = amax / divisor;
    const float step = std::isnan(raw) ? raw : nvfp4_step(nvfp4_scale_bits(raw), s2);  // E4M3 NaN: a NaN block
    for (int64_t j = 0; j < n; j++) y[b0 + j] = E2M1_TABLE[e2m1_code(x[b0 + j] / step)] * step;
  }
}

// INT8: int8_code(x) * scale.
static void int8_row(const float* x, int64_t k, float scale, float* y) {
  for (int64_t j = 0; j < k; j++) y[j] = int8_code(x[j], scale) * scale;
}

// FP8: e4m3(clamp(x / scale, -448, 448)) * scale (NaN stays NaN, as the cast keeps it).
static void fp8_row(const float* x, int64_t k, float scale, float* y) {
  for (int64_t j = 0; j < k; j++) {
    float q = std::clamp(x[j] / scale, -448.0f, 448.0f);
    y[j] = std::isnan(q) ? q : E4M3.v[e4m3_from_float(q)] * scale;
  }
}

at::Tensor fake_quant_activations(int64_t format, const at::Tensor& x, double scale) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "fake_quant_activations: fp32 CPU input");
  TORCH_CHECK(format == 0 || format == 2 || format == 3 || format == ACT_INT8_GROUPS,
              "fake_quant_activations: format 0 (NVFP4), 2 (INT8), 3 (FP8) or 5 (INT8 per 128-group)");
  if (format == ACT_INT8_GROUPS) return int8_group_fake_quant(x);  // dynamic: no per-tensor scale
  at::Tensor x2 = x.contiguous(), y = at::empty_like(x2);
  const int64_t k = x2.dim() ? x2.size(-1) : 1, rows = k ? x2.numel() / k : 0;
  const float* X = x2.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  const float s = (float)scale;
  auto row = format == 0 ? nvfp4_row : format == 2 ? int8_row : fp8_row;
  at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / std::max<int64_t>(k, 1)), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; r++) row(X + r * k, k, s, Y + r * k);
  });
  return y;
}
