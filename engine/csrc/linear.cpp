// y = x @ W.T + b in fp32 for W row-major [out, in]: blocks of 4 weight rows x up to 4 input rows of dot
// products, weight rows split across threads. Every output is one dot product accumulated alone, in the same
// order whatever the number of input rows, so a many-row call gives each row bit for bit what a 1-row call gives.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "vec.h"

constexpr int64_t ROWS_PER_CHUNK = 16;  // weight rows kept in L1 while every 4-row block of x passes over them
constexpr int64_t PREFETCH = 256;       // floats ahead along each weight row

// Y[m, o] = dot(X[m, :], W[o, :]) + b[o] for R weight rows from o0 and M input rows: R*M accumulators.
template <int R, int M>
static inline void block(const float* W, const float* X, const float* b, float* Y, int64_t in, int64_t out,
                         int64_t o0) {
  vf acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = vzero();
  const float* w0 = W + o0 * in;
  int64_t i = 0;
  for (; i + V <= in; i += V) {
    vf xv[M];
    for (int m = 0; m < M; m++) xv[m] = vload(X + m * in + i);
    for (int r = 0; r < R; r++) {
      prefetch(w0 + r * in + i + PREFETCH);
      vf w = vload(w0 + r * in + i);
      for (int m = 0; m < M; m++) acc[r][m] = vfma(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      float s = hsum(acc[r][m]) + (b ? b[o0 + r] : 0.0f);
      for (int64_t j = i; j < in; j++) s += w0[r * in + j] * X[m * in + j];
      Y[m * out + o0 + r] = s;
    }
}

template <int M>
static void rows(const float* W, const float* X, const float* b, float* Y, int64_t in, int64_t out, int64_t begin,
                 int64_t end) {
  int64_t o = begin;
  for (; o + 4 <= end; o += 4) block<4, M>(W, X, b, Y, in, out, o);
  for (; o < end; o++) block<1, M>(W, X, b, Y, in, out, o);
}

static void gemm_rows(const float* W, const float* X, const float* b, float* Y, int64_t n, int64_t in, int64_t out) {
  at::parallel_for(0, out, ROWS_PER_CHUNK, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o += ROWS_PER_CHUNK) {
      int64_t oe = std::min(end, o + ROWS_PER_CHUNK);
      for (int64_t m = 0; m < n; m += 4) {
        const float* Xm = X + m * in;
        float* Ym = Y + m * out;
        switch (std::min<int64_t>(4, n - m)) {
          case 1: rows<1>(W, Xm, b, Ym, in, out, o, oe); break;
          case 2: rows<2>(W, Xm, b, Ym, in, out, o, oe); break;
          case 3: rows<3>(W, Xm, b, Ym, in, out, o, oe); break;
          default: rows<4>(W, Xm, b, Ym, in, out, o, oe); break;
        }
      }
    }
  });
}

// x [..., in] (fp32) @ weight_t [in, out], the transpose of a row-major fp32 [out, in] (+ contiguous bias [out]).
at::Tensor linear(const at::Tensor& x, const at::Tensor& weight_t, const std::optional<at::Tensor>& bias) {
  int64_t in = weight_t.size(0), out = weight_t.size(1);
  TORCH_CHECK(is_f32_cpu(x) && is_f32_cpu(weight_t) && weight_t.stride(0) == 1 &&
              (weight_t.stride(1) == in || out == 1), "linear: fp32 CPU, weight_t the transpose of [out, in]");
  TORCH_CHECK(!bias || (is_f32_cpu(*bias) && bias->is_contiguous()), "linear: contiguous fp32 CPU bias");
  TORCH_CHECK(x.size(-1) == in, "linear: x has ", x.size(-1), " features, the weight ", in);
  at::Tensor x2 = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  gemm_rows(weight_t.data_ptr<float>(), x2.data_ptr<float>(), bias ? bias->data_ptr<float>() : nullptr,
            y.data_ptr<float>(), x2.numel() / in, in, out);
  return y;
}
