// INT8 W8A8 (SmoothQuant) as integers: the input is quantized per tensor to int8 codes (the reference's rounding),
// each output is the exact int32 sum of code products, then float(sum) * (act_scale * w_scale[r]) + b[r]: the bits
// of the GPU path (`int8_matmul`: `torch._int_mm`, then the scales, then the bias). Integer sums do not depend on
// their order, so any number of input rows, and either instruction set, gives each row the bits of a one-row call:
// AVX512-VNNI `vpdpbusd` (64 products an instruction) or AVX2 `vpmaddwd` on codes widened to 16 bits (exact:
// `vpmaddubsw` would saturate on code -128). Elsewhere `packed_linear` multiplies the quantized values in fp32.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "encode.h"
#include "packed_ops.h"
#include "vec.h"

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#include <immintrin.h>
#define INT8_INTEGER_PATH 1
using XCode = uint8_t;
constexpr int X_OFFSET = 128;  // the input codes are stored + 128 (unsigned bytes for vpdpbusd)
constexpr int ROWS = 4;        // weight rows a block: 4 x 4 accumulators + operands fit 32 registers
constexpr int PASS_ROWS = 4;   // input rows a pass over a block of weight rows

// vpdpbusd multiplies unsigned by signed bytes, so inputs are stored offset by 128 (code + 128, in 0..255) and
// 128 * sum(w) is taken back off (`wsum`: the weight rows' sums, computed once a block by `row_sums`).
// Not auto-vectorized: GCC 12 turned the tail loop into a wrong byte dot product (tested: k = 37, codes < 0).
template <int R, int M>
__attribute__((optimize("no-tree-vectorize"))) static void dot_block(const uint8_t* X, int64_t ldx, const int8_t* W,
                                                                     int64_t k, const int32_t* wsum,
                                                                     int64_t out_stride, int32_t* S) {
  __m512i acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_si512();
  int64_t j = 0;
  for (; j + 64 <= k; j += 64) {
    __m512i xv[M];
    for (int m = 0; m < M; m++) xv[m] = _mm512_loadu_si512(X + m * ldx + j);
    for (int r = 0; r < R; r++) {
      const __m512i w = _mm512_loadu_si512(W + r * k + j);
      for (int m = 0; m < M; m++) acc[r][m] = _mm512_dpbusd_epi32(acc[r][m], xv[m], w);
    }
  }
  for (int m = 0; m < M; m++) {
    int32_t s[R];
    if constexpr (R == 4) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(s), hsum4_epi32(acc[0][m], acc[1][m], acc[2][m], acc[3][m]));
    } else {
      for (int r = 0; r < R; r++) s[r] = _mm512_reduce_add_epi32(acc[r][m]);
    }
    for (int r = 0; r < R; r++) {
      int32_t t = s[r] - 128 * wsum[r];
      for (int64_t i = j; i < k; i++) t += (int32_t)X[m * ldx + i] * W[r * k + i];  // wsum spans the tail too
      S[m * out_stride + r] = t;
    }
  }
}

// wsum[r] = the sum of weight row r's codes, for n rows.
static void row_sums(const int8_t* W, int64_t n, int64_t k, int32_t* wsum) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < n; r++) {
    __m512i acc = _mm512_setzero_si512();
    int64_t j = 0;
    for (; j + 64 <= k; j += 64) acc = _mm512_dpbusd_epi32(acc, ones, _mm512_loadu_si512(W + r * k + j));
    int32_t t = _mm512_reduce_add_epi32(acc);
    for (; j < k; j++) t += W[r * k + j];
    wsum[r] = t;
  }
}

#elif defined(__AVX2__)
#include <immintrin.h>
#define INT8_INTEGER_PATH 1
using XCode = int16_t;  // the input codes widened once, so that vpmaddwd takes them straight from memory
constexpr int X_OFFSET = 0;
constexpr int ROWS = 1;  // the streaming pass's blocks (vec.h)
constexpr int PASS_ROWS = STREAM_ROWS;

// 16 weight codes at a time widened to int16; `vpmaddwd` adds adjacent products into int32 lanes
// (|sum| <= 2 * 128^2).
template <int R, int M>
__attribute__((optimize("no-tree-vectorize"))) static void dot_block(const int16_t* X, int64_t ldx, const int8_t* W,
                                                                     int64_t k, const int32_t*, int64_t out_stride,
                                                                     int32_t* S) {
  __m256i acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_si256();
  int64_t j = 0;
  for (; j + 16 <= k; j += 16) {
    for (int r = 0; r < R; r++) {
      const __m256i w = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(W + r * k + j)));
      for (int m = 0; m < M; m++) {
        const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(X + m * ldx + j));
        acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(w, x));
      }
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      int32_t s = hsum_epi32(acc[r][m]);
      for (int64_t t = j; t < k; t++) s += X[m * ldx + t] * W[r * k + t];
      S[m * out_stride + r] = s;
    }
}

static void row_sums(const int8_t*, int64_t, int64_t, int32_t*) {}  // signed codes: no offset to take off
#endif

#ifdef INT8_INTEGER_PATH
bool int8_integer_path() { return true; }

template <int M>
[[gnu::noinline]] static void dot_rows(const XCode* X, int64_t ldx, const int8_t* W, int64_t n, int64_t k,
                                       const int32_t* wsum, int64_t out_stride, int32_t* S) {
  int64_t r = 0;
  for (; r + ROWS <= n; r += ROWS) dot_block<ROWS, M>(X, ldx, W + r * k, k, wsum + r, out_stride, S + r);
  for (; r < n; r++) dot_block<1, M>(X, ldx, W + r * k, k, wsum + r, out_stride, S + r);
}

// Input rows [0, m) of X against weight rows [r0, r1): a block of weight rows at a time, small enough to stay in L1
// (a third of a 48 KB one) while every block of input rows passes over it, so each weight is read from memory once
// for all rows.
constexpr int64_t L1_BLOCK_BYTES = 16384;

static void dot_all(const XCode* X, int64_t m, const int8_t* W, int64_t r0, int64_t r1, int64_t k, int32_t* S,
                    int64_t out_stride) {
  const int64_t block = std::max<int64_t>(ROWS, L1_BLOCK_BYTES / k / ROWS * ROWS);
  std::vector<int32_t> wsum(block);
  for (int64_t rb = r0; rb < r1; rb += block) {
    const int64_t n = std::min(r1, rb + block) - rb;
    row_sums(W + rb * k, n, k, wsum.data());
    for_row_blocks<PASS_ROWS>(m, [&]<int M>(int64_t i) {
      dot_rows<M>(X + i * k, k, W + rb * k, n, k, wsum.data(), out_stride, S + i * out_stride + rb);
    });
  }
}

// x [n] (times pre [n], if given: torch's fp32 product) -> int8_code(x, sx) + offset as Code: bytes (offset 0: the
// signed codes' bytes) 16 at a time with AVX-512, or int16.
template <class Code>
static void quantize_codes(const float* x, const float* pre, int64_t n, float sx, int offset, Code* out) {
  int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (sizeof(Code) == 1) {
    const __m512 s = _mm512_set1_ps(sx);
    const __m512i off = _mm512_set1_epi32(offset);
    for (; i + 16 <= n; i += 16) {
      __m512 v = _mm512_loadu_ps(x + i);
      if (pre) v = _mm512_mul_ps(v, _mm512_loadu_ps(pre + i));
      const __m512i c = _mm512_add_epi32(int8_codes16(v, s), off);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm512_cvtepi32_epi8(c));
    }
  }
#endif
  for (; i < n; i++) out[i] = (Code)((int)int8_code(pre ? x[i] * pre[i] : x[i], sx) + offset);
}

// X [m, k] -> codes [m, ldq] (`quantize_codes` per row), rows split over the threads: done serially, the other
// thread spun at the next parallel region's barrier for as long. Codes past k in a row are left as they are.
template <class Code>
static void quantize_rows(const float* X, const float* pre, int64_t m, int64_t k, float sx, int offset, Code* out,
                          int64_t ldq) {
  at::parallel_for(0, m, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; i++) quantize_codes(X + i * k, pre, k, sx, offset, out + i * ldq);
  });
}

// y[r] = float(sum[r]) * (sx * ws[r]), then + b[r]: two roundings, as torch takes them (no fused multiply-add).
__attribute__((optimize("fp-contract=off"))) static void scale_sums(const int32_t* sum, int64_t r0, int64_t r1, float sx,
                                                                   const float* ws, const float* b, float* y) {
  for (int64_t r = r0; r < r1; r++) {
    float v = (float)sum[r] * (sx * ws[r]);
    y[r] = b ? v + b[r] : v;
  }
}

// Many rows: oneDNN's int8 GEMM (`onednn::qlinear_pointwise`: signed codes, exact int32 sums, then
// float(sum) * (act_scale * w_scale[r]) + b[r] in its epilogue: the bits of `scale_sums`, tested) on a copy of the
// codes that `int8_gemm_pack` put in oneDNN's blocked layout once. Packing per call (`at::_int_mm`) took longer than
// the products at a prompt's rows, and its int32 sums made a round trip through memory. With AMX it wins from 16
// rows (one-off timings in the README); without, from 32 (the crossover measured for `at::_int_mm`). The sums are
// exact either way, so the outputs keep their bits. Only where the CPU multiplies bytes with VNNI: without it
// oneDNN's int8 kernels may saturate 16-bit pair sums.
#if defined(__AVX512VNNI__) || defined(__AVXVNNI__)
constexpr bool GEMM_SUMS_EXACT = true;
#else
constexpr bool GEMM_SUMS_EXACT = false;
#endif
constexpr int64_t GEMM_MIN_ROWS = 32, GEMM_MIN_ROWS_AMX = 16;

static at::Tensor call_op(const char* name, torch::jit::Stack stack) {
  c10::Dispatcher::singleton().findSchemaOrThrow(name, "").callBoxed(&stack);
  return stack.at(0).toTensor();
}

std::vector<at::Tensor> int8_gemm_pack(const std::vector<at::Tensor>& codes, const std::vector<at::Tensor>& scales) {
  if (!GEMM_SUMS_EXACT || !at::hasMKLDNN()) return {};
  std::vector<at::Tensor> signed_codes;
  for (const at::Tensor& c : codes) signed_codes.push_back(c.view(at::kChar));
  const at::Tensor w = at::cat(signed_codes);  // [out, k]
  return {call_op("onednn::qlinear_prepack", {w, c10::IValue()}), at::cat(scales).contiguous(),
          at::zeros({w.size(0)}, at::kLong)};
}

// y [m, out] from X [m, k]: its signed codes through oneDNN against `gemm` ({packed codes, scales, zero points}).
static at::Tensor gemm_linear(const float* X, const float* pre, int64_t m, int64_t k, float sx,
                              const std::vector<at::Tensor>& gemm, const std::optional<at::Tensor>& bias) {
  at::Tensor xq = at::empty({m, k}, at::kChar);
  quantize_rows(X, pre, m, k, sx, 0, reinterpret_cast<uint8_t*>(xq.data_ptr<int8_t>()), k);
  return call_op("onednn::qlinear_pointwise",
                 {xq, (double)sx, 0, gemm[0], gemm[1], gemm[2], bias ? c10::IValue(*bias) : c10::IValue(), 1.0, 0,
                  at::kFloat, std::string("none"), c10::List<std::optional<at::Scalar>>(), std::string("")});
}

at::Tensor int8_integer_linear(const at::Tensor& x, double act_scale, const std::vector<at::Tensor>& codes,
                               const std::vector<at::Tensor>& scales, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& pre_scale, const std::vector<at::Tensor>& gemm) {
  const int64_t k = x.size(-1);
  at::Tensor x2 = x.contiguous();
  const int64_t m = k ? x2.numel() / k : 0;
  int64_t out = 0;
  for (const at::Tensor& c : codes) {
    TORCH_CHECK(c.scalar_type() == at::kByte && c.is_contiguous() && c.dim() == 2 && c.size(1) == k,
                "int8_integer_linear: uint8 codes [rows, k]");
    out += c.size(0);
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  if (m == 0 || out == 0) return at::empty(shape, x.options());
  const float sx = (float)act_scale;
  const float* X = x2.data_ptr<float>();
  const at::Tensor pre_c = pre_scale ? pre_scale->contiguous() : at::Tensor();
  const float* pre = pre_scale ? pre_c.data_ptr<float>() : nullptr;
  // Many rows: oneDNN's GEMM where the layer has its packed copy; else AMX tiles where there are some, on signed
  // codes in rows padded to whole tiles (zeros add nothing); else the codes + X_OFFSET through these loops.
  const bool amx = amx_int8_available(), tiles = m >= AMX_MIN_ROWS_INT8 && amx && sizeof(XCode) == 1;
  if (GEMM_SUMS_EXACT && !gemm.empty() && m >= (amx ? GEMM_MIN_ROWS_AMX : GEMM_MIN_ROWS))
    return gemm_linear(X, pre, m, k, sx, gemm, bias).view(shape);
  at::Tensor y = at::empty(shape, x.options());
  float* Y = y.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  // Tiles take rows padded to 16 and columns to 64 with zero codes; every other code and every sum is written
  // before it is read, so neither buffer is cleared (clearing them cost ~2% of a mixed step).
  const int64_t kp = tiles ? (k + 63) / 64 * 64 : k, mp = tiles ? (m + 15) / 16 * 16 : m;
  auto xq = std::make_unique_for_overwrite<XCode[]>(mp * kp);
  quantize_rows(X, pre, m, k, sx, tiles ? 0 : X_OFFSET, xq.get(), kp);
  for (int64_t i = 0; i < m && kp > k; i++) std::fill(xq.get() + i * kp + k, xq.get() + (i + 1) * kp, XCode{0});
  std::fill(xq.get() + m * kp, xq.get() + mp * kp, XCode{0});
  auto sums = std::make_unique_for_overwrite<int32_t[]>(m * out);
  for (size_t s = 0, col0 = 0; s < codes.size(); col0 += codes[s].size(0), s++) {
    const int8_t* W = reinterpret_cast<const int8_t*>(codes[s].data_ptr<uint8_t>());
    const float* ws = scales[s].data_ptr<float>();
    at::parallel_for(0, codes[s].size(0), 16, [&](int64_t r0, int64_t r1) {
      if (tiles)
        amx_int8_sums(reinterpret_cast<const int8_t*>(xq.get()), m, kp, W + r0 * k, r1 - r0, k,
                      sums.get() + col0 + r0, out);
      else
        dot_all(xq.get(), m, W, r0, r1, k, sums.get() + col0, out);
      for (int64_t i = 0; i < m; i++)
        scale_sums(sums.get() + i * out + col0, r0, r1, sx, ws, b ? b + col0 : nullptr, Y + i * out + col0);
    });
  }
  return y;
}

#else

bool int8_integer_path() { return false; }

std::vector<at::Tensor> int8_gemm_pack(const std::vector<at::Tensor>&, const std::vector<at::Tensor>&) { return {}; }

at::Tensor int8_integer_linear(const at::Tensor&, double, const std::vector<at::Tensor>&,
                               const std::vector<at::Tensor>&, const std::optional<at::Tensor>&,
                               const std::optional<at::Tensor>&, const std::vector<at::Tensor>&) {
  TORCH_CHECK(false, "int8_integer_linear: this build has neither AVX512-VNNI nor AVX2");
}

#endif
