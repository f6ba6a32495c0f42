// Row-wise ops, one pass each where ATen takes several small ones: RMSNorm, SiLU-gated product, RoPE.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

// RMSNorm over the last dim, HF's math: x * rsqrt(mean(x^2) + eps) * w, in fp32.
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps) {
  TORCH_CHECK(is_f32_cpu(x) && is_f32_cpu(w) && x.is_contiguous() && w.is_contiguous(), "rms_norm: contiguous fp32 CPU");
  int64_t d = x.size(-1), n = x.numel() / d;
  at::Tensor y = at::empty_like(x);
  const float *X = x.data_ptr<float>(), *Wp = w.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / d), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const float* xr = X + r * d;
      float ss = dot(xr, xr, d);
      float inv = 1.0f / std::sqrt(ss / d + (float)eps);
      for (int64_t j = 0; j < d; j++) Y[r * d + j] = Wp[j] * (xr[j] * inv);
    }
  });
  return y;
}

// silu(gate) * up for gu = [..., 2I] holding [gate | up].
at::Tensor silu_mul(const at::Tensor& gu) {
  TORCH_CHECK(is_f32_cpu(gu) && gu.is_contiguous(), "silu_mul: contiguous fp32 CPU");
  int64_t i2 = gu.size(-1), I = i2 / 2;
  std::vector<int64_t> shape(gu.sizes().begin(), gu.sizes().end());
  shape.back() = I;
  at::Tensor y = at::empty(shape, gu.options());
  int64_t n = gu.numel() / i2;
  const float* G = gu.data_ptr<float>();
  float* Y = y.data_ptr<float>();
  at::parallel_for(0, n, std::max<int64_t>(1, 32768 / I), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; r++) {
      const float *g = G + r * i2, *u = g + I;
      float* y = Y + r * I;
      int64_t j = 0;
      for (; j + V <= I; j += V) {
        vf gv = vload(g + j);
        vstore(y + j, gv / (vset(1.0f) + vexp(vzero() - gv)) * vload(u + j));
      }
      for (; j < I; j++) y[j] = g[j] / (1.0f + std::exp(-g[j])) * u[j];
    }
  });
  return y;
}

// In place: rotate interleaved pairs of heads [0, nheads) of x [B, S, N, D] by freqs [B, S, D/2, 2] (cos, sin).
void rope_(at::Tensor& x, const at::Tensor& freqs, int64_t nheads) {
  TORCH_CHECK(is_f32_cpu(x) && x.is_contiguous() && is_f32_cpu(freqs) && freqs.is_contiguous(), "rope_: fp32 CPU");
  int64_t B = x.size(0), S = x.size(1), N = x.size(2), D = x.size(3);
  float* X = x.data_ptr<float>();
  const float* F = freqs.data_ptr<float>();
  at::parallel_for(0, B * S, std::max<int64_t>(1, 8192 / (nheads * D)), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; t++) {
      const float* f = F + t * D;
      for (int64_t h = 0; h < nheads; h++) {
        float* p = X + (t * N + h) * D;
        for (int64_t j = 0; j < D / 2; j++) {
          float a = p[2 * j], c = p[2 * j + 1], co = f[2 * j], si = f[2 * j + 1];
          p[2 * j] = a * co - c * si;
          p[2 * j + 1] = a * si + c * co;
        }
      }
    }
  });
}
