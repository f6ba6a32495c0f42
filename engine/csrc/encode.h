// Encoders from fp32 to the formats' codes, each giving the bits of its reference in kernels/ (torch's cast to
// float8_e4m3fn; `e2m1_encode_reference`): shared by the KV-cache write and the activation quantizer.
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
