// The fused KV-cache write: one call per layer per forward encodes k or v [B, S, KV, D] straight into the packed
// pools of the rows it is written to, giving the bits of the references in kernels/ (fp8.py `quantize_fp8_reference`,
// nvfp4_kv.py `quantize_nvfp4_kv_reference`): the same divisions, comparisons and E4M3/E2M1 rounding. NVFP4 keys are
// centred on the layer's mean key and rotated first (fp32 D x D matvec per head, in this kernel's summation order).
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "encode.h"
#include "ops.h"
#include "packed_decode.h"
#include "vec.h"

// One 16-element block x -> packed codes q[8] and its E4M3 scale: of the candidate scales amax / (6 * s2) * f,
// the first with the least squared error of the decoded block. Products rounded as the reference rounds them (no
// fused multiply-add), so only the order of the error's 8-pair sum differs from it.
__attribute__((optimize("fp-contract=off"))) static uint8_t encode_nvfp4_block(const float* x, float s2, const std::vector<float>& factors, uint8_t* q) {
  float amax = 0.0f;
  for (int j = 0; j < 16; j++) amax = std::max(amax, std::fabs(x[j]));
  const float base = amax / (6.0f * s2);
  float best_err = INFINITY;
  uint8_t best_s = 0, codes[16], best[16];
  for (float f : factors) {
    uint8_t sbits = nvfp4_scale_bits(base * f);
    float step = nvfp4_step(sbits, s2), err = 0.0f;
    for (int j = 0; j < 16; j += 2) {
      codes[j] = e2m1_code(x[j] / step), codes[j + 1] = e2m1_code(x[j + 1] / step);
      float de = E2M1_TABLE[codes[j]] * step - x[j], dd = E2M1_TABLE[codes[j + 1]] * step - x[j + 1];
      err += de * de + dd * dd;
    }
    if (err < best_err) best_err = err, best_s = sbits, std::memcpy(best, codes, 16);
  }
  for (int j = 0; j < 8; j++) q[j] = best[2 * j] | (best[2 * j + 1] << 4);
  return best_s;
}

// Unquantized pools: k and v [B, S, KV, D] (rows of KV * D contiguous) copied into token rows rows[b * S + s] of
// k_pool / v_pool [T, KV, D]: what index_copy_ does, without its per-call dispatch (two per layer per step).
void kv_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows, at::Tensor& k_pool,
              at::Tensor& v_pool) {
  for (const at::Tensor* t : {&k, &v})
    TORCH_CHECK(is_f32_cpu(*t) && t->dim() == 4 && t->stride(3) == 1 && t->stride(2) == t->size(3) &&
                t->sizes() == k.sizes(), "kv_store: k, v fp32 [B, S, KV, D], rows of KV * D contiguous");
  const int64_t S = k.size(1), W = k.size(2) * k.size(3), R = k.size(0) * S;
  for (const at::Tensor* p : {&k_pool, &v_pool})
    TORCH_CHECK(is_f32_cpu(*p) && p->is_contiguous() && p->numel() % W == 0, "kv_store: fp32 pools [T, KV, D]");
  TORCH_CHECK(rows.scalar_type() == at::kLong && rows.is_contiguous() && rows.numel() == R,
              "kv_store: int64 rows, one per token");
  const int64_t T = k_pool.numel() / W, *row = rows.data_ptr<int64_t>();
  for (int64_t i = 0; i < R; i++) TORCH_CHECK(row[i] >= 0 && row[i] < T, "kv_store: a row outside the pool");
  for (auto [x, pool] : {std::pair{&k, &k_pool}, std::pair{&v, &v_pool}}) {
    const float* X = x->data_ptr<float>();
    float* P = pool->data_ptr<float>();
    for (int64_t r = 0; r < R; r++)
      std::memcpy(P + row[r] * W, X + (r / S) * x->stride(0) + (r % S) * x->stride(1), W * sizeof(float));
  }
}

// x [B, S, KV, D] (unit stride along D, heads D apart) written at pool token rows rows[b * S + s].
// FP8 (format 3): codes [T, KV * D] = E4M3(clamp(x / scale)). NVFP4 (format 0): codes [T, KV * D / 2], scales
// [T, KV * D / 16] of y = (x - mean) @ rot per head (mean [KV, D] and rot [D, D], symmetric, each optional).
void kv_write(int64_t format, const at::Tensor& x, const at::Tensor& rows, at::Tensor& codes, at::Tensor& scales,
              double scale, const at::Tensor& mean, const at::Tensor& rot, const std::vector<double>& factors) {
  TORCH_CHECK(is_f32_cpu(x) && x.dim() == 4 && x.stride(3) == 1 && x.stride(2) == x.size(3),
              "kv_write: x fp32 [B, S, KV, D], rows of KV * D contiguous");
  int64_t B = x.size(0), S = x.size(1), KV = x.size(2), D = x.size(3), R = B * S;
  TORCH_CHECK(format == 0 || format == 3, "kv_write: format 0 (NVFP4) or 3 (FP8)");
  TORCH_CHECK(rows.numel() == R && codes.is_contiguous() && codes.scalar_type() == at::kByte,
              "kv_write: a pool row per token, uint8 code pools");
  at::Tensor r64 = rows.to(at::kLong).contiguous();
  const int64_t* row = r64.data_ptr<int64_t>();
  const int64_t T = codes.numel() / (format == 3 ? KV * D : KV * D / 2);
  for (int64_t i = 0; i < R; i++) TORCH_CHECK(row[i] >= 0 && row[i] < T, "kv_write: a row outside the pool");
  const float* X = x.data_ptr<float>();
  uint8_t* Q = codes.data_ptr<uint8_t>();
  const float sc = (float)scale;
  if (format == 3) {
    at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; r++) {
        const float* xr = X + (r / S) * x.stride(0) + (r % S) * x.stride(1);
        uint8_t* q = Q + row[r] * KV * D;
        for (int64_t c = 0; c < KV * D; c++) q[c] = e4m3_from_float(std::clamp(xr[c] / sc, -448.0f, 448.0f));
      }
    });
    return;
  }
  TORCH_CHECK(D % 16 == 0 && scales.is_contiguous() && scales.numel() == T * KV * D / 16,
              "kv_write: NVFP4 needs head_dim % 16 == 0 and a scale pool [T, KV * D / 16]");
  const bool centre = mean.numel() > 0, rotate = rot.numel() > 0;
  TORCH_CHECK(!centre || (is_f32_cpu(mean) && mean.is_contiguous() && mean.numel() == KV * D), "kv_write: mean [KV, D]");
  TORCH_CHECK(!rotate || (is_f32_cpu(rot) && rot.is_contiguous() && rot.numel() == D * D), "kv_write: rot [D, D]");
  const float *M = centre ? mean.data_ptr<float>() : nullptr, *Hm = rotate ? rot.data_ptr<float>() : nullptr;
  uint8_t* Sc = scales.data_ptr<uint8_t>();
  const std::vector<float> f(factors.begin(), factors.end());
  at::parallel_for(0, R * KV, 4, [&](int64_t i0, int64_t i1) {
    std::vector<float> y(D), z(D);
    for (int64_t i = i0; i < i1; i++) {
      int64_t r = i / KV, h = i % KV;
      const float* xr = X + (r / S) * x.stride(0) + (r % S) * x.stride(1) + h * D;
      for (int64_t c = 0; c < D; c++) y[c] = centre ? xr[c] - M[h * D + c] : xr[c];
      for (int64_t c = 0; c < D && rotate; c++) z[c] = dot(y.data(), Hm + c * D, D);  // row c = column c
      const float* src = rotate ? z.data() : y.data();
      uint8_t *q = Q + (row[r] * KV + h) * D / 2, *s = Sc + (row[r] * KV + h) * D / 16;
      for (int64_t blk = 0; blk < D / 16; blk++) s[blk] = encode_nvfp4_block(src + 16 * blk, sc, f, q + 8 * blk);
    }
  });
}
