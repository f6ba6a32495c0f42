// y = x @ W.T + b in fp32 for W row-major [out, in]: register blocks of R weight rows x M input rows of dot
// products, weight rows split across threads. Up to MAX_STREAM_ROWS input rows share one pass over the weights,
// so a speculative verify reads each weight once, as a decode step does. Every output is one dot product
// accumulated alone, in the same order whatever R and M, so a many-row call gives each row bit for bit what a
// 1-row call gives.
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "vec.h"

// A block holds R*M accumulators and R weight vectors in registers (one spare); x is read from L1.
constexpr int MAX_ROWS_PER_PASS = std::min(16, NUM_VREGS - 2);  // R = 1: M accumulators + 1 weight register
constexpr int MAX_WEIGHT_ROWS = 4;
constexpr int64_t ROWS_PER_CHUNK = 16;  // weight rows kept in L1 while every pass of x goes over them
constexpr int64_t PREFETCH = 256;       // floats ahead along each weight row
// Input rows that share the pass streaming each weight row from memory (vec.h), and weight rows a block there: with
// AVX-512 9 rows in blocks of up to 4 weight rows; with AVX2 12 rows against one weight row (12 accumulators, the
// weight and x fit its 16 registers), so a verify of up to 12 rows (a tree of 11 nodes) makes no second pass.
constexpr int MAX_STREAM_ROWS = STREAM_ONE_WEIGHT_ROW ? 12 : 9;
constexpr int STREAM_WEIGHT_ROWS = STREAM_ONE_WEIGHT_ROW ? 1 : MAX_WEIGHT_ROWS;

// Weight rows per block for M input rows: the most whose R*M accumulators and R weights fit the registers.
constexpr int weight_rows_for(int M, int most = MAX_WEIGHT_ROWS) {
  return std::max(1, std::min(most, (NUM_VREGS - 1) / (M + 1)));
}

// Input rows per pass when there are more than one pass takes (prefill): the M whose block does the most FMAs
// per vector loaded (R*M per R+M), as compute, not the weight read, bounds a many-row GEMM.
constexpr int compute_bound_rows() {
  int best = 1;
  for (int M = 1; M <= MAX_ROWS_PER_PASS; M++) {
    int R = weight_rows_for(M), Rb = weight_rows_for(best);
    if (R * M * (Rb + best) > Rb * best * (R + M)) best = M;
  }
  return best;
}

// Y[m, o] = dot(X[m, :], W[o, :]) + b[o] for R weight rows from o0 and M input rows.
template <int R, int M>
static inline void block(const float* W, const float* X, const float* b, float* Y, int64_t in, int64_t out,
                         int64_t o0) {
  vf acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = vzero();
  const float* w0 = W + o0 * in;
  int64_t i = 0;
  for (; i + V <= in; i += V) {
    vf w[R];
    for (int r = 0; r < R; r++) {
      prefetch(w0 + r * in + i + PREFETCH);
      w[r] = vload(w0 + r * in + i);
    }
    for (int m = 0; m < M; m++) {
      vf xv = vload(X + m * in + i);
      for (int r = 0; r < R; r++) acc[r][m] = vfma(w[r], xv, acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      float s = hsum(acc[r][m]) + (b ? b[o0 + r] : 0.0f);
      for (int64_t j = i; j < in; j++) s = std::fma(w0[r * in + j], X[m * in + j], s);  // fused alike everywhere
      Y[m * out + o0 + r] = s;
    }
}

// Weight rows [begin, end) against M input rows, R weight rows per block. Out of line, so that each (R, M) loop is
// compiled alike wherever it is called: inlined, the same 7- or 8-row pass ran a fifth slower in one caller.
template <int R, int M>
[[gnu::noinline]] static void rows(const float* W, const float* X, const float* b, float* Y, int64_t in, int64_t out,
                                   int64_t begin, int64_t end) {
  int64_t o = begin;
  for (; o + R <= end; o += R) block<R, M>(W, X, b, Y, in, out, o);
  for (; o < end; o++) block<1, M>(W, X, b, Y, in, out, o);
}

// Each chunk of weight rows is streamed from memory once, by a pass of up to MAX_STREAM_ROWS input rows (all of a
// decode batch or a speculative verify); the rest (a big batch, a tree, prefill) go in compute-bound passes over the
// chunk while it sits in L1/L2 (a one-weight-row block of 16 inputs loads as many vectors as it multiplies).
static void gemm_rows(const float* W, const float* X, const float* b, float* Y, int64_t n, int64_t in, int64_t out) {
  if (n == 0) return;  // a pass computes at least one row
  constexpr int per_pass = compute_bound_rows();
  at::parallel_for(0, out, ROWS_PER_CHUNK, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o += ROWS_PER_CHUNK) {
      int64_t oe = std::min(end, o + ROWS_PER_CHUNK);
      int64_t m = std::min<int64_t>(n, MAX_STREAM_ROWS);
      with_rows<MAX_STREAM_ROWS>(m, [&]<int M>() {
        rows<weight_rows_for(M, STREAM_WEIGHT_ROWS), M>(W, X, b, Y, in, out, o, oe);
      });
      for (; m < n; m += per_pass)
        with_rows<per_pass>(std::min<int64_t>(per_pass, n - m), [&]<int M>() {
          rows<weight_rows_for(M), M>(W, X + m * in, b, Y + m * out, in, out, o, oe);
        });
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
