// INT4 W4A8: AWQ INT4 weights (two output rows per byte, an fp32 scale per 128-group of k) times activations
// quantized to int8 per input row and 128-group (scale amax / 127, at run time), as llama.cpp multiplies its 4-bit
// blocks by q8 activations. Per group the code products are summed as integers (exact, so in any order), then
// y = sum over groups, in order, of float(sum_g) * (x_scale_g * w_scale_g), then + b: what the reference
// `int4_w4a8_matmul` (engine/weight_formats/int4.py) computes, bit for bit, on every ISA and for any number of input rows.
// Integer dot products: AVX512-VNNI `vpdpbusd`, AVX2 `vpmaddubsw` + `vpmaddwd`, else scalar. Both take unsigned
// by signed bytes, so the weight codes go in as code + 8 (nibble ^ 8, in 0..15) and 8 * sum(x codes) is taken off.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "encode.h"
#include "packed_ops.h"
#include "vec.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

constexpr int64_t CHUNK = 64;   // activation rows are zero-padded to a multiple of this

// One call's activations: per row the codes (zero-padded to `ldq`), and per (row, group) the scale and the code sum
// (the one-row kernels' correction for their unsigned nibbles; the AMX path sign-extends them and needs none).
struct Int8Groups {
  int64_t groups, ldq;
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> sum;
};

// Per group: scale = amax / 127 (1 for an all-zero group), code = int8_code(x, scale) (`Int8GroupTensor`).
static Int8Groups quantize_groups(const float* X, int64_t m, int64_t k, bool sums) {
  Int8Groups a{(k + W4A8_GROUP - 1) / W4A8_GROUP, (k + CHUNK - 1) / CHUNK * CHUNK, {}, {}, {}};
  a.q.assign((m + 15) / 16 * 16 * a.ldq, 0);  // rows to a whole AMX tile: zeros add nothing
  a.scale.resize(m * a.groups);
  if (sums) a.sum.resize(m * a.groups);
  for (int64_t i = 0; i < m; i++)
    for (int64_t g = 0; g < a.groups; g++) {
      const float* x = X + i * k + g * W4A8_GROUP;
      const int64_t n = std::min(W4A8_GROUP, k - g * W4A8_GROUP);
      float amax = 0.0f;
      for (int64_t j = 0; j < n; j++) amax = std::max(amax, std::fabs(x[j]));
      const float s = amax / 127.0f == 0.0f ? 1.0f : amax / 127.0f;
      int32_t sum = 0;
      for (int64_t j = 0; j < n; j++) {
        const int8_t c = (int8_t)int8_code(x[j], s);
        a.q[i * a.ldq + g * W4A8_GROUP + j] = c;
        sum += c;
      }
      a.scale[i * a.groups + g] = s;
      if (sums) a.sum[i * a.groups + g] = sum;
    }
  return a;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
constexpr int PAIRS = 2;  // row pairs per block: 4 rows x 4 inputs x (1 accumulator) + operands fit 32 registers

// out[i] = the sum of v[i]'s 16 lanes, four vectors at a time: unpack-and-add steps leave each 128-bit lane holding
// partial sums of all four, then the four lanes are added (13 instructions for 4 sums instead of ~32).
static inline void reduce_lanes(const __m512i* v, int n, int32_t* out) {
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(v[i], v[i + 1]), _mm512_unpackhi_epi32(v[i], v[i + 1]));
    const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(v[i + 2], v[i + 3]),
                                        _mm512_unpackhi_epi32(v[i + 2], v[i + 3]));
    const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
    const __m256i half = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
    const __m128i four = _mm_add_epi32(_mm256_castsi256_si128(half), _mm256_extracti128_si256(half, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), four);  // [a, b, c, d]
  }
  for (; i < n; i++) out[i] = _mm512_reduce_add_epi32(v[i]);
}

// S[g * 2PM + m * 2P + r] = sum over group g of (code_r + 8) * x_m, for P row pairs and M input rows.
template <int P, int M>
static void group_sums(const uint8_t* W, int64_t k, const int8_t* Xq, int64_t ldq, int64_t groups, int32_t* S) {
  const __m512i flip = _mm512_set1_epi8((char)0x88), low = _mm512_set1_epi8(0x0F);
  for (int64_t g = 0; g < groups; g++) {
    __m512i acc[2 * P][M];
    for (int r = 0; r < 2 * P; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm512_setzero_si512();
    for (int64_t j = g * W4A8_GROUP; j < std::min(k, (g + 1) * W4A8_GROUP); j += CHUNK) {
      const __mmask64 in_row = j + CHUNK <= k ? ~0ULL : (1ULL << (k - j)) - 1;  // past k: code 0 x input 0
      __m512i x[M];
      for (int m = 0; m < M; m++) x[m] = _mm512_loadu_si512(Xq + m * ldq + j);
      for (int p = 0; p < P; p++) {
        const __m512i b = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in_row, W + p * k + j), flip);
        const __m512i even = _mm512_and_si512(b, low), odd = _mm512_and_si512(_mm512_srli_epi16(b, 4), low);
        for (int m = 0; m < M; m++) {
          acc[2 * p][m] = _mm512_dpbusd_epi32(acc[2 * p][m], even, x[m]);
          acc[2 * p + 1][m] = _mm512_dpbusd_epi32(acc[2 * p + 1][m], odd, x[m]);
        }
      }
    }
    int32_t sums[2 * P * M];
    reduce_lanes(&acc[0][0], 2 * P * M, sums);
    for (int r = 0; r < 2 * P; r++)
      for (int m = 0; m < M; m++) S[(g * M + m) * 2 * P + r] = sums[r * M + m];
  }
}

#elif defined(__AVX2__)
constexpr int PAIRS = 1;  // 16 registers: 2 rows x 4 inputs accumulators + operands

template <int P, int M>
static void group_sums(const uint8_t* W, int64_t k, const int8_t* Xq, int64_t ldq, int64_t groups, int32_t* S) {
  const __m256i flip = _mm256_set1_epi8((char)0x88), low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  alignas(32) uint8_t tail[P][32];
  for (int64_t g = 0; g < groups; g++) {
    __m256i acc[2 * P][M];
    for (int r = 0; r < 2 * P; r++)
      for (int m = 0; m < M; m++) acc[r][m] = _mm256_setzero_si256();
    for (int64_t j = g * W4A8_GROUP; j < std::min(k, (g + 1) * W4A8_GROUP); j += 32) {
      __m256i x[M];
      for (int m = 0; m < M; m++) x[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(Xq + m * ldq + j));
      for (int p = 0; p < P; p++) {
        const uint8_t* src = W + p * k + j;
        if (j + 32 > k) {  // past k: code 0 x input 0
          std::fill(tail[p], tail[p] + 32, 0);
          std::copy(src, src + (k - j), tail[p]);
          src = tail[p];
        }
        const __m256i b = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)), flip);
        const __m256i even = _mm256_and_si256(b, low), odd = _mm256_and_si256(_mm256_srli_epi16(b, 4), low);
        for (int m = 0; m < M; m++) {  // (0..15) x (-128..127) pairs stay far inside int16
          acc[2 * p][m] = _mm256_add_epi32(acc[2 * p][m], _mm256_madd_epi16(_mm256_maddubs_epi16(even, x[m]), ones));
          acc[2 * p + 1][m] = _mm256_add_epi32(acc[2 * p + 1][m], _mm256_madd_epi16(_mm256_maddubs_epi16(odd, x[m]), ones));
        }
      }
    }
    for (int r = 0; r < 2 * P; r++)
      for (int m = 0; m < M; m++) S[(g * M + m) * 2 * P + r] = hsum_epi32(acc[r][m]);
  }
}

#else
constexpr int PAIRS = 1;

template <int P, int M>
static void group_sums(const uint8_t* W, int64_t k, const int8_t* Xq, int64_t ldq, int64_t groups, int32_t* S) {
  for (int64_t g = 0; g < groups; g++)
    for (int p = 0; p < P; p++)
      for (int m = 0; m < M; m++) {
        int32_t even = 0, odd = 0;
        for (int64_t j = g * W4A8_GROUP; j < std::min(k, (g + 1) * W4A8_GROUP); j++) {
          const uint8_t b = W[p * k + j] ^ 0x88;
          even += (b & 0x0F) * Xq[m * ldq + j];
          odd += (b >> 4) * Xq[m * ldq + j];
        }
        S[(g * M + m) * 2 * P + 2 * p] = even;
        S[(g * M + m) * 2 * P + 2 * p + 1] = odd;
      }
}
#endif

// Y[m * ldy + r] for the 2P rows from `pair` and M input rows from `i`: the integer sums, less 8 * sum(x codes),
// scaled and added over the groups in order; two roundings each (no fused multiply-add), as torch takes them. The
// 2PM outputs are independent lanes (l = m * 2P + r), stepped through the groups together so the compiler can
// keep them in vector registers; each lane's operations and their order are a scalar loop's.
template <int P, int M>
__attribute__((optimize("fp-contract=off"))) static void w4a8_block(const uint8_t* codes, const float* ws, int64_t k,
                                                                    const Int8Groups& a, int64_t i, const float* b,
                                                                    float* Y, int64_t ldy) {
  constexpr int L = 2 * P * M;
  const int64_t G = a.groups;
  int32_t S[L * ((4096 + W4A8_GROUP - 1) / W4A8_GROUP)];  // [G, L]; k <= 4096 is checked by the caller
  group_sums<P, M>(codes, k, a.q.data() + i * a.ldq, a.ldq, G, S);
  float y[L] = {};
  for (int64_t g = 0; g < G; g++) {
    int32_t exact[L];
    float scale[L];
    for (int l = 0; l < L; l++) {
      const int m = l / (2 * P), r = l % (2 * P);
      exact[l] = S[g * L + l] - 8 * a.sum[(i + m) * G + g];
      scale[l] = a.scale[(i + m) * G + g] * ws[r * G + g];
    }
    for (int l = 0; l < L; l++) y[l] = y[l] + (float)exact[l] * scale[l];
  }
  for (int l = 0; l < L; l++) {
    const int m = l / (2 * P), r = l % (2 * P);
    Y[m * ldy + r] = b ? y[l] + b[r] : y[l];
  }
}

// A block's weight bytes are asked into the cache PREFETCH_BLOCKS blocks ahead: at one input row the block's few
// products otherwise wait on its masked weight loads (perf: most cycles stalled there).
constexpr int64_t PREFETCH_BLOCKS = 4;

template <int M>
static void w4a8_rows(const uint8_t* codes, const float* ws, int64_t pairs, int64_t k, const Int8Groups& a, int64_t i,
                      const float* b, float* Y, int64_t ldy) {
  int64_t p = 0;
  for (; p + PAIRS <= pairs; p += PAIRS) {
    prefetch_lines(codes + (p + PREFETCH_BLOCKS * PAIRS) * k, PAIRS * k);
    w4a8_block<PAIRS, M>(codes + p * k, ws + 2 * p * a.groups, k, a, i, b ? b + 2 * p : nullptr, Y + 2 * p, ldy);
  }
  for (; p < pairs; p++)
    w4a8_block<1, M>(codes + p * k, ws + 2 * p * a.groups, k, a, i, b ? b + 2 * p : nullptr, Y + 2 * p, ldy);
}

at::Tensor int4_w4a8_linear(const at::Tensor& x, const std::vector<at::Tensor>& codes,
                            const std::vector<at::Tensor>& scales, const std::optional<at::Tensor>& bias) {
  const int64_t k = x.size(-1);
  TORCH_CHECK(k <= 4096, "int4_w4a8_linear: k up to 4096");
  at::Tensor x2 = x.contiguous();
  const int64_t m = k ? x2.numel() / k : 0;
  int64_t out = 0;
  for (const at::Tensor& c : codes) out += 2 * c.size(0);
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  if (m == 0 || out == 0) return y;
  const bool tiles = m >= AMX_MIN_ROWS_W4A8 && amx_int8_available();
  const Int8Groups a = quantize_groups(x2.data_ptr<float>(), m, k, !tiles);
  float* Y = y.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  for (size_t s = 0, col0 = 0; s < codes.size(); col0 += 2 * codes[s].size(0), s++) {
    const uint8_t* W = codes[s].data_ptr<uint8_t>();
    const float* ws = scales[s].data_ptr<float>();
    at::parallel_for(0, codes[s].size(0), 8, [&](int64_t p0, int64_t p1) {
      const int64_t col = col0 + 2 * p0;
      const float* bp = b ? b + col : nullptr;
      if (tiles)
        return amx_w4a8(a.q.data(), m, a.ldq, a.scale.data(), a.groups, W + p0 * k, p1 - p0, k,
                        ws + 2 * p0 * a.groups, bp, Y + col, out);
      for_row_blocks(m, [&]<int M>(int64_t i) {
        w4a8_rows<M>(W + p0 * k, ws + 2 * p0 * a.groups, p1 - p0, k, a, i, bp, Y + i * out + col, out);
      });
    });
  }
  return y;
}

// x -> code * scale per row and 128-group: the values the W4A8 matmul multiplies (fake quantization, QAT).
at::Tensor int8_group_fake_quant(const at::Tensor& x) {
  at::Tensor x2 = x.contiguous(), y = at::empty_like(x2);
  const int64_t k = x2.dim() ? x2.size(-1) : 1, m = k ? x2.numel() / k : 0;
  const Int8Groups a = quantize_groups(x2.data_ptr<float>(), m, k, false);
  float* Y = y.data_ptr<float>();
  for (int64_t i = 0; i < m; i++)
    for (int64_t j = 0; j < k; j++) Y[i * k + j] = a.q[i * a.ldq + j] * a.scale[i * a.groups + j / W4A8_GROUP];
  return y;
}
