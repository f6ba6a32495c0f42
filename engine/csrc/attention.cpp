// Attention of a few query rows per sequence over the KV cache (decode and speculative verify), GQA, each row
// bounded by its own position (and sliding window), so neither needs a mask.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

// y[j] = e^(x[j] - shift) for j < n; returns their sum.
static inline float exp_sum(float* x, int64_t n, float shift) {
  vf acc = vzero(), sh = vset(shift);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    vf e = vexp(vload(x + j) - sh);
    vstore(x + j, e);
    acc += e;
  }
  float s = hsum(acc);
  for (; j < n; j++) s += (x[j] = std::exp(x[j] - shift));
  return s;
}

// s[j] = dot(q, k_j) * scale for keys k_j = k + j * stride, j in [start, end): four keys at a time.
static inline void scores(const float* q, const float* k, int64_t stride, int64_t D, int64_t start, int64_t end,
                          float scale, float* s) {
  int64_t j = start;
  if (D % V == 0) {
    for (; j + 4 <= end; j += 4) {
      const float* k0 = k + j * stride;
      vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t c = 0; c < D; c += V) {
        vf qv = vload(q + c);
        a0 = vfma(qv, vload(k0 + c), a0);
        a1 = vfma(qv, vload(k0 + stride + c), a1);
        a2 = vfma(qv, vload(k0 + 2 * stride + c), a2);
        a3 = vfma(qv, vload(k0 + 3 * stride + c), a3);
      }
      s[j] = hsum(a0) * scale, s[j + 1] = hsum(a1) * scale, s[j + 2] = hsum(a2) * scale, s[j + 3] = hsum(a3) * scale;
    }
  }
  for (; j < end; j++) s[j] = dot(q, k + j * stride, D) * scale;
}

// o[:N*V] = scale * sum_j p[j] * v_j[:N*V], accumulated in N registers.
template <int N>
static inline void weighted_sum_regs(const float* p, float scale, const float* v, int64_t stride, int64_t start,
                                     int64_t end, float* o) {
  vf acc[N];
  for (int n = 0; n < N; n++) acc[n] = vzero();
  for (int64_t j = start; j < end; j++) {
    vf pj = vset(p[j]);
    for (int n = 0; n < N; n++) acc[n] = vfma(pj, vload(v + j * stride + n * V), acc[n]);
  }
  for (int n = 0; n < N; n++) vstore(o + n * V, acc[n] * vset(scale));
}

// o[:D] = scale * sum_j p[j] * v_j for values v_j = v + j * stride, j in [start, end).
static inline void weighted_sum(const float* p, float scale, const float* v, int64_t stride, int64_t D,
                                int64_t start, int64_t end, float* o) {
  switch (D % V == 0 ? D / V : 0) {
    case 2: return weighted_sum_regs<2>(p, scale, v, stride, start, end, o);
    case 4: return weighted_sum_regs<4>(p, scale, v, stride, start, end, o);
    case 8: return weighted_sum_regs<8>(p, scale, v, stride, start, end, o);
    default:
      for (int64_t c = 0; c < D; c++) o[c] = 0;
      for (int64_t j = start; j < end; j++)
        for (int64_t c = 0; c < D; c++) o[c] += p[j] * v[j * stride + c];
      for (int64_t c = 0; c < D; c++) o[c] *= scale;
  }
}

// S query rows per sequence: q [B, S, >=H, D] (heads [0, H) used), keys/values [B, KV, L, D] (strided views),
// pos [B, S]; row (b, s) attends keys (pos[b, s] - window, pos[b, s]] (window <= 0: all up to pos[b, s]).
// Each (row, head) is computed on its own with the same loops, so a row's output does not depend on S or B:
// a 6-row speculative verify gives bit for bit what six 1-row decode steps give. Returns [B, S, H*D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& pos,
                            int64_t H, int64_t window) {
  TORCH_CHECK(is_f32_cpu(q) && is_f32_cpu(k) && is_f32_cpu(v) && q.stride(3) == 1 && k.stride(3) == 1 &&
              v.stride(3) == 1, "decode_attention: fp32 CPU, unit stride along head_dim");
  int64_t B = q.size(0), S = q.size(1), D = q.size(3), KV = k.size(1), L = k.size(2), G = H / KV;
  TORCH_CHECK(pos.numel() == B * S, "decode_attention: one position per query row");
  at::Tensor out = at::empty({B, S, H * D}, q.options());
  at::Tensor p64 = pos.to(at::kLong).contiguous();
  const int64_t* P = p64.data_ptr<int64_t>();
  const float *Q = q.data_ptr<float>(), *K = k.data_ptr<float>(), *Vp = v.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)D);
  int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, L * D));
  at::parallel_for(0, B * S * H, grain, [&](int64_t b0, int64_t e0) {
    std::vector<float> sc(L);
    for (int64_t bsh = b0; bsh < e0; bsh++) {
      int64_t bs = bsh / H, b = bs / S, s = bs % S, h = bsh % H, g = h / G;
      int64_t end = std::min<int64_t>(P[bs] + 1, L), start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const float* qv = Q + b * q.stride(0) + s * q.stride(1) + h * q.stride(2);
      const float* kb = K + b * k.stride(0) + g * k.stride(1);
      const float* vb = Vp + b * v.stride(0) + g * v.stride(1);
      scores(qv, kb, k.stride(2), D, start, end, scale, sc.data());
      float mx = -INFINITY;
      for (int64_t j = start; j < end; j++) mx = std::max(mx, sc[j]);
      float inv = 1.0f / exp_sum(sc.data() + start, end - start, mx);
      weighted_sum(sc.data(), inv, vb, v.stride(2), D, start, end, O + bs * H * D + h * D);
    }
  });
  return out;
}
