// Encoders from fp32 to the formats' codes, each giving the bits of its reference in kernels/ (torch's cast to
// float8_e4m3fn; `e2m1_encode_reference`, `nvfp4_block_scale`, `quantize_int8_reference`): shared by the KV-cache
// write, the activation quantizer and the INT8 integer matmul.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// fp32 -> FP8 E4M3 bits, round to nearest even, as torch's cast; |f| <= 448 (callers clamp), NaN -> 0x7F.
static inline uint8_t e4m3_from_float(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  uint8_t sign = (bits >> 24) & 0x80;
  float a = std::fabs(f);
  if (std::isnan(a)) return sign | 0x7F;
  if (a < 0.015625f)  // below 2^-6: a subnormal, m * 2^-9 with m rounded to even (m == 8 is the first normal)
    return sign | (uint8_t)std::nearbyint(a * 512.0f);
  uint32_t ab = bits & 0x7FFFFFFF;
  ab += 0x7FFFF + ((ab >> 20) & 1);  // round the 23-bit mantissa to 3 bits, ties to even (may carry into e)
  int e = (int)(ab >> 23) - 127 + 7;
  return sign | (uint8_t)std::min(0x7E, (e << 3) | (int)((ab >> 20) & 7));
}

// A value already divided by its step -> its E2M1 code (sign << 3 | magnitude index), `e2m1_encode_reference`.
static inline uint8_t e2m1_code(float v) {
  float a = std::fabs(v);
  if (std::isnan(a)) return 7 | (v < 0 ? 8 : 0);
  int idx = (a > 0.25f) + (a >= 0.75f) + (a > 1.25f) + (a >= 1.75f) + (a > 2.5f) + (a >= 3.5f) + (a > 5.0f);
  return (uint8_t)idx | (v < 0 ? 8 : 0);
}

// An NVFP4 block scale amax / (6 * s2) (or a multiple) -> the E4M3 bits stored: 1 for an all-zero block, clamped to
// [2^-9, 448] (`nvfp4_block_scale`; a NaN stays NaN, 0x7F).
static inline uint8_t nvfp4_scale_bits(float raw) {
  return e4m3_from_float(std::clamp(raw == 0.0f ? 1.0f : raw, 0.001953125f, 448.0f));
}

// x -> its INT8 code with a per-tensor scale: clamp(round_half_even(x / scale), -128, 127), as a float (a NaN
// stays NaN; torch's int8 cast of it is undefined).
static inline float int8_code(float x, float scale) {
  return std::clamp(std::nearbyint(x / scale), -128.0f, 127.0f);
}

#if defined(__AVX512F__)
#include <immintrin.h>
// int8_code over 16 lanes, as int32: the same IEEE division, round-half-even and clamp.
static inline __m512i int8_codes16(__m512 x, __m512 scale) {
  __m512 v = _mm512_roundscale_ps(_mm512_div_ps(x, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_cvtps_epi32(_mm512_min_ps(_mm512_max_ps(v, _mm512_set1_ps(-128.0f)), _mm512_set1_ps(127.0f)));
}
#endif
