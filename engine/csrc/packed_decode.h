// Decoders from the packed weight formats (and bf16) to fp32 rows, one per format, each giving bit for bit the values of the
// format's dequantize reference in kernels/ (nvfp4.py, int4.py, int8.py, fp8.py): the same products, rounded once.
// Each format has one vector decoder, `*_vec`: the V weights of a row from element j (a multiple of V) in
// registers, which packed_linear.cpp multiplies straight away for a few input rows (decode, verify); the row
// decoders below store those same vectors into a tile that many input rows (prefill) share, so both paths multiply
// the same values in the same order. Written for AVX-512 and for AVX2 (4-bit codes through a 16-entry table in
// registers); every other target gets the portable loops.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>

#include "vec.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

// E2M1 codes (sign << 3 | magnitude index) -> values; 0x8 decodes to +0.0 as in ModelOpt's table.
alignas(64) static const float E2M1_TABLE[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                                 0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};

// FP8 E4M3 bits -> fp32 (exact; the NaN codes 0x7F/0xFF are not produced by the quantizers).
static inline float e4m3_to_float(uint8_t b) {
  int e = (b >> 3) & 15, m = b & 7;
  float mag = e ? std::ldexp(1.0f + m / 8.0f, e - 7) : std::ldexp((float)m, -9);
  return (b & 0x80) ? -mag : mag;
}

struct E4M3Table {
  float v[256];
  E4M3Table() {
    for (int b = 0; b < 256; b++) v[b] = e4m3_to_float((uint8_t)b);
  }
};
static const E4M3Table E4M3;

// ---- NVFP4: one row of nb 16-element blocks: q [nb * 8] bytes (even element low), s [nb] E4M3 bits ----
// value = e2m1(code) * (e4m3(s) * s2), the step rounded once as `dequantize_nvfp4_reference` does.
static inline float nvfp4_step(uint8_t s, float s2) { return E4M3.v[s] * s2; }

// Elements [j, j + V) of a row; `step` is their block's.
static inline vf nvfp4_vec(const uint8_t* q, int64_t j, float step) {
#if defined(__AVX512F__)
  const __m512 table = _mm512_load_ps(E2M1_TABLE);
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j / 2));
  __m512i idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts);  // permute reads bits 0-3
  return _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(step));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_load_ps(E2M1_TABLE), hi = _mm256_load_ps(E2M1_TABLE + 8);
  const __m256i shifts = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  int32_t four;
  std::memcpy(&four, q + j / 2, 4);
  __m128i b = _mm_cvtsi32_si128(four);
  __m256i idx = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts);
  __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 of the code in the sign bit
  __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sign);
  return (vf)_mm256_mul_ps(v, _mm256_set1_ps(step));
#else
  alignas(64) float out[V];
  for (int64_t e = 0; e < V; e++) out[e] = E2M1_TABLE[(q[(j + e) / 2] >> (4 * ((j + e) & 1))) & 15] * step;
  return vload(out);
#endif
}

// AVX-512 decodes NVFP4 two blocks at a time: the 32 elements [j, j + 32) from one 16-byte load, as their even
// elements (`even`, the low nibbles) and their odd ones (`odd`), lanes 0-7 of block j / 16 and 8-15 of the next.
// The matmul lays x out alike (`nvfp4_pair_order`), so these are the same products as two `nvfp4_vec`s would
// feed it, from half the loads and byte conversions. AVX2 keeps one block a vector, in order.
#if defined(__AVX512F__)
constexpr bool NVFP4_PAIRS = true;
static inline void nvfp4_pair_vec(const uint8_t* q, int64_t j, float step0, float step1, vf& even, vf& odd) {
  const __m512 table = _mm512_load_ps(E2M1_TABLE);
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j / 2)));
#if defined(__AVX512DQ__)
  __m512 steps = _mm512_insertf32x8(_mm512_set1_ps(step0), _mm256_set1_ps(step1), 1);
#else
  __m512 steps = _mm512_mask_broadcastss_ps(_mm512_set1_ps(step0), 0xFF00, _mm_set_ss(step1));
#endif
  even = _mm512_mul_ps(_mm512_permutexvar_ps(b, table), steps);  // permute reads bits 0-3: the low nibble
  odd = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table), steps);
}
#else
constexpr bool NVFP4_PAIRS = false;
static inline void nvfp4_pair_vec(const uint8_t*, int64_t, float, float, vf&, vf&) {}
#endif

// x [k] -> the order the NVFP4 matmul multiplies it in: within each whole 32-element span, the even elements then
// the odd ones (NVFP4_PAIRS); the rest as it is.
static inline void nvfp4_pair_order(const float* x, int64_t k, float* dst) {
  int64_t j = 0;
  for (; NVFP4_PAIRS && j + 32 <= k; j += 32)
    for (int64_t l = 0; l < 16; l++) dst[j + l] = x[j + 2 * l], dst[j + 16 + l] = x[j + 2 * l + 1];
  for (; j < k; j++) dst[j] = x[j];
}

// A row of nb blocks decoded into dst in the matmul's order for an input of k elements (`nvfp4_pair_order`).
static inline void decode_nvfp4_row(const uint8_t* q, const uint8_t* s, float s2, int64_t nb, int64_t k, float* dst) {
  int64_t j = 0;
  for (; NVFP4_PAIRS && j + 32 <= k; j += 32) {
    vf even, odd;
    nvfp4_pair_vec(q, j, nvfp4_step(s[j / 16], s2), nvfp4_step(s[j / 16 + 1], s2), even, odd);
    vstore(dst + j, even), vstore(dst + j + 16, odd);
  }
  for (; j < 16 * nb; j += V) vstore(dst + j, nvfp4_vec(q, j, nvfp4_step(s[j / 16], s2)));
}

// ---- INT4 (AWQ export layout): q [K] bytes holding rows 2i (low nibble) and 2i+1 (high), scales [G] per row ----
// value = code * scale[k / group], one fp32 product as in `dequantize_int4_reference`.
// Signed nibbles -> values, as the 16-entry table a permute reads (AVX-512).
alignas(64) static const float INT4_TABLE[16] = {0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1};

// Elements [j, j + V) of row 2i (`odd` false) or 2i+1 of a byte row q, all in one group of `scale`.
static inline vf int4_vec(const uint8_t* q, int64_t j, float scale, bool odd) {
#if defined(__AVX512F__)
  __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
  if (odd) v = _mm512_srli_epi32(v, 4);
  return _mm512_mul_ps(_mm512_permutexvar_ps(v, _mm512_load_ps(INT4_TABLE)), _mm512_set1_ps(scale));
#elif defined(__AVX2__)
  __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
  __m256 c = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, odd ? 24 : 28), 28));  // sign-extended
  return (vf)_mm256_mul_ps(c, _mm256_set1_ps(scale));
#else
  alignas(64) float out[V];
  for (int64_t e = 0; e < V; e++) out[e] = (float)(odd ? (int8_t)q[j + e] >> 4 : (int8_t)(q[j + e] << 4) >> 4) * scale;
  return vload(out);
#endif
}

static inline void decode_int4_span(const uint8_t* q, float se, float so, int64_t j, int64_t end, float* even,
                                    float* odd) {
  for (; j + V <= end; j += V) {
    vstore(even + j, int4_vec(q, j, se, false));
    vstore(odd + j, int4_vec(q, j, so, true));
  }
  for (; j < end; j++) {
    even[j] = (float)((int8_t)(q[j] << 4) >> 4) * se;
    odd[j] = (float)((int8_t)q[j] >> 4) * so;
  }
}

static inline void decode_int4_pair(const uint8_t* q, const float* se, const float* so, int64_t k, int64_t group,
                                    float* even, float* odd) {
  for (int64_t g = 0, j = 0; j < k; g++, j += group) decode_int4_span(q, se[g], so[g], j, std::min(k, j + group), even, odd);
}

// ---- INT8, per-channel scale: value = code * scale (`dequantize_int8_reference`) ----
static inline vf int8_vec(const int8_t* q, int64_t j, float scale) {
#if defined(__AVX512F__)
  __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
  return _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scale));
#elif defined(__AVX2__)
  __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
  return (vf)_mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale));
#else
  alignas(64) float out[V];
  for (int64_t e = 0; e < V; e++) out[e] = (float)q[j + e] * scale;
  return vload(out);
#endif
}

static inline void decode_int8_row(const int8_t* q, float scale, int64_t k, float* dst) {
  int64_t j = 0;
  for (; j + V <= k; j += V) vstore(dst + j, int8_vec(q, j, scale));
  for (; j < k; j++) dst[j] = (float)q[j] * scale;
}

// ---- FP8 E4M3, per-tensor scale: value = e4m3(bits) * scale (`dequantize_fp8_reference`) ----
// Bits -> fp32 in registers: a normal code moves exponent and mantissa into place and rebiases the exponent
// (+120), a subnormal one (exponent 0) is mantissa * 2^-9; both exact.
static inline vf fp8_vec(const uint8_t* q, int64_t j, float scale) {
#if defined(__AVX512F__)
  __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
  __m512i em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
  __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
  __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(em, _mm512_set1_epi32(7))),
                             _mm512_set1_ps(0.001953125f));
  __mmask16 is_normal = _mm512_cmpge_epi32_mask(em, _mm512_set1_epi32(8));
  __m512i mag = _mm512_castps_si512(_mm512_mask_blend_ps(is_normal, sub, normal));
  __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
  return _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mag, sign)), _mm512_set1_ps(scale));
#elif defined(__AVX2__)
  __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
  __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
  __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
  __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(em, _mm256_set1_epi32(7))),
                             _mm256_set1_ps(0.001953125f));
  __m256 is_normal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(em, _mm256_set1_epi32(7)));
  __m256i mag = _mm256_castps_si256(_mm256_blendv_ps(sub, normal, is_normal));
  __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
  return (vf)_mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sign)), _mm256_set1_ps(scale));
#else
  alignas(64) float out[V];
  for (int64_t e = 0; e < V; e++) out[e] = E4M3.v[q[j + e]] * scale;
  return vload(out);
#endif
}

static inline void decode_fp8_row(const uint8_t* q, float scale, int64_t k, float* dst) {
  int64_t j = 0;
  for (; j + V <= k; j += V) vstore(dst + j, fp8_vec(q, j, scale));
  for (; j < k; j++) dst[j] = E4M3.v[q[j]] * scale;
}

// ---- BF16: value = the bf16 bits in the top half of an fp32 (exact) ----
static inline vf bf16_vec(const uint16_t* q, int64_t j) {
#if defined(__AVX512F__)
  __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
#elif defined(__AVX2__)
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
  return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
#else
  alignas(64) float out[V];
  for (int64_t e = 0; e < V; e++) {
    uint32_t bits = (uint32_t)q[j + e] << 16;
    std::memcpy(out + e, &bits, 4);
  }
  return vload(out);
#endif
}

static inline void decode_bf16_row(const uint16_t* q, int64_t k, float* dst) {
  int64_t j = 0;
  for (; j + V <= k; j += V) vstore(dst + j, bf16_vec(q, j));
  for (; j < k; j++) {
    uint32_t bits = (uint32_t)q[j] << 16;
    std::memcpy(dst + j, &bits, 4);
  }
}
