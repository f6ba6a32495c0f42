// Decoders from the packed weight formats (and bf16) to fp32 rows, one per format, each giving bit for bit the values of the
// format's dequantize reference in kernels/ (nvfp4.py, int4.py, int8.py, fp8.py): the same products, rounded once.
// They write a tile of weight rows that packed_linear.cpp multiplies while it is still in cache.
// Hot loops are written for AVX-512 and for AVX2 (E2M1 codes through a 16-entry table in registers); every other
// target gets the portable loops below them.
#pragma once

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>

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
static inline void decode_nvfp4_block(const uint8_t* q, float step, float* dst) {
#if defined(__AVX512F__)
  const __m512 table = _mm512_load_ps(E2M1_TABLE);
  const __m512i shifts = _mm512_set_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  __m512i idx = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts);  // permute reads bits 0-3
  _mm512_storeu_ps(dst, _mm512_mul_ps(_mm512_permutexvar_ps(idx, table), _mm512_set1_ps(step)));
#elif defined(__AVX2__)
  const __m256 lo = _mm256_load_ps(E2M1_TABLE), hi = _mm256_load_ps(E2M1_TABLE + 8);
  const __m256i shifts = _mm256_set_epi32(4, 0, 4, 0, 4, 0, 4, 0);
  for (int h = 0; h < 2; h++) {
    int32_t four;
    std::memcpy(&four, q + 4 * h, 4);
    __m128i b = _mm_cvtsi32_si128(four);
    __m256i idx = _mm256_srlv_epi32(_mm256_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), shifts);
    __m256 sign = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 of the code in the sign bit
    __m256 v = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), sign);
    _mm256_storeu_ps(dst + 8 * h, _mm256_mul_ps(v, _mm256_set1_ps(step)));
  }
#else
  for (int j = 0; j < 8; j++) {
    dst[2 * j] = E2M1_TABLE[q[j] & 15] * step;
    dst[2 * j + 1] = E2M1_TABLE[q[j] >> 4] * step;
  }
#endif
}

static inline void decode_nvfp4_row(const uint8_t* q, const uint8_t* s, float s2, int64_t nb, float* dst) {
  for (int64_t blk = 0; blk < nb; blk++) decode_nvfp4_block(q + 8 * blk, E4M3.v[s[blk]] * s2, dst + 16 * blk);
}

// ---- INT4 (AWQ export layout): q [K] bytes holding rows 2i (low nibble) and 2i+1 (high), scales [G] per row ----
// value = code * scale[k / group], one fp32 product as in `dequantize_int4_reference`.
static inline void decode_int4_span(const uint8_t* q, float se, float so, int64_t n, float* even, float* odd) {
  int64_t j = 0;
#if defined(__AVX512F__)
  const __m512 vse = _mm512_set1_ps(se), vso = _mm512_set1_ps(so);
  for (; j + 16 <= n; j += 16) {
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    __m512 lo = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 28), 28));  // sign-extend the nibble
    __m512 hi = _mm512_cvtepi32_ps(_mm512_srai_epi32(_mm512_slli_epi32(v, 24), 28));
    _mm512_storeu_ps(even + j, _mm512_mul_ps(lo, vse));
    _mm512_storeu_ps(odd + j, _mm512_mul_ps(hi, vso));
  }
#elif defined(__AVX2__)
  const __m256 vse = _mm256_set1_ps(se), vso = _mm256_set1_ps(so);
  for (; j + 8 <= n; j += 8) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    __m256 lo = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 28), 28));
    __m256 hi = _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(v, 24), 28));
    _mm256_storeu_ps(even + j, _mm256_mul_ps(lo, vse));
    _mm256_storeu_ps(odd + j, _mm256_mul_ps(hi, vso));
  }
#endif
  for (; j < n; j++) {
    even[j] = (float)((int8_t)(q[j] << 4) >> 4) * se;
    odd[j] = (float)((int8_t)q[j] >> 4) * so;
  }
}

static inline void decode_int4_pair(const uint8_t* q, const float* se, const float* so, int64_t k, int64_t group,
                                    float* even, float* odd) {
  for (int64_t g = 0, j = 0; j < k; g++, j += group)
    decode_int4_span(q + j, se[g], so[g], std::min(group, k - j), even + j, odd + j);
}

// ---- INT8, per-channel scale: value = code * scale (`dequantize_int8_reference`) ----
static inline void decode_int8_row(const int8_t* q, float scale, int64_t k, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16) {
    __m512i v = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_cvtepi32_ps(v), _mm512_set1_ps(scale)));
  }
#elif defined(__AVX2__)
  for (; j + 8 <= k; j += 8) {
    __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(scale)));
  }
#endif
  for (; j < k; j++) dst[j] = (float)q[j] * scale;
}

// ---- FP8 E4M3, per-tensor scale: value = e4m3(bits) * scale (`dequantize_fp8_reference`) ----
// Bits -> fp32 in registers: a normal code moves exponent and mantissa into place and rebiases the exponent
// (+120), a subnormal one (exponent 0) is mantissa * 2^-9; both exact.
static inline void decode_fp8_row(const uint8_t* q, float scale, int64_t k, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16) {
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    __m512i em = _mm512_and_si512(b, _mm512_set1_epi32(0x7F));
    __m512 normal = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), _mm512_set1_epi32(120 << 23)));
    __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(em, _mm512_set1_epi32(7))),
                               _mm512_set1_ps(0.001953125f));
    __mmask16 is_normal = _mm512_cmpge_epi32_mask(em, _mm512_set1_epi32(8));
    __m512i mag = _mm512_castps_si512(_mm512_mask_blend_ps(is_normal, sub, normal));
    __m512i sign = _mm512_slli_epi32(_mm512_and_si512(b, _mm512_set1_epi32(0x80)), 24);
    _mm512_storeu_ps(dst + j, _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(mag, sign)), _mm512_set1_ps(scale)));
  }
#elif defined(__AVX2__)
  for (; j + 8 <= k; j += 8) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
    __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
    __m256 normal = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
    __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_and_si256(em, _mm256_set1_epi32(7))),
                               _mm256_set1_ps(0.001953125f));
    __m256 is_normal = _mm256_castsi256_ps(_mm256_cmpgt_epi32(em, _mm256_set1_epi32(7)));
    __m256i mag = _mm256_castps_si256(_mm256_blendv_ps(sub, normal, is_normal));
    __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    _mm256_storeu_ps(dst + j, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(mag, sign)), _mm256_set1_ps(scale)));
  }
#endif
  for (; j < k; j++) dst[j] = E4M3.v[q[j]] * scale;
}

// ---- BF16: value = the bf16 bits in the top half of an fp32 (exact) ----
static inline void decode_bf16_row(const uint16_t* q, int64_t k, float* dst) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= k; j += 16) {
    __m512i v = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j)));
    _mm512_storeu_ps(dst + j, _mm512_castsi512_ps(_mm512_slli_epi32(v, 16)));
  }
#elif defined(__AVX2__)
  for (; j + 8 <= k; j += 8) {
    __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j)));
    _mm256_storeu_ps(dst + j, _mm256_castsi256_ps(_mm256_slli_epi32(v, 16)));
  }
#endif
  for (; j < k; j++) {
    uint32_t bits = (uint32_t)q[j] << 16;
    std::memcpy(dst + j, &bits, 4);
  }
}
