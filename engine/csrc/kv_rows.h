// Readers of one KV head's rows in a KV-cache pool, for the attention kernel: `load(i, c)` gives the V values
// [c, c + V) of the sequence's position i (c a multiple of V), `at(i, c)` one value. `off` holds the pool offsets of
// the sequence's positions: element offsets (fp32 pools, any strides) or token rows times KV (packed pools,
// contiguous [N, bs, KV, width]). Packed values decode to exactly the formats' dequantize references (packed_decode.h),
// so attention over a packed pool gives bit for bit what it gives over the decoded fp32 pool.
#pragma once

#include <cstdint>

#include "packed_decode.h"
#include "vec.h"

struct F32Rows {
  const float* p;  // the head's first element
  const int64_t* off;
  vf load(int64_t i, int64_t c) const { return vload(p + off[i] + c); }
  float at(int64_t i, int64_t c) const { return p[off[i] + c]; }
};

// FP8 E4M3 codes [.., D] per token and head: value = e4m3(code) * scale.
struct Fp8Rows {
  const uint8_t* p;
  const int64_t* off;
  int64_t D;
  float scale;
  vf load(int64_t i, int64_t c) const { return fp8_vec(p + off[i] * D, c, scale); }
  float at(int64_t i, int64_t c) const { return E4M3.v[p[off[i] * D + c]] * scale; }
};

// NVFP4 codes [.., D/2] (even element in the low nibble) and E4M3 block scales [.., D/16] per token and head:
// value = e2m1(code) * (e4m3(block scale) * s2).
struct Nvfp4Rows {
  const uint8_t *q, *s;
  const int64_t* off;
  int64_t D;
  float s2;
  float step(int64_t i, int64_t c) const { return nvfp4_step(s[off[i] * (D / 16) + c / 16], s2); }
  vf load(int64_t i, int64_t c) const { return nvfp4_vec(q + off[i] * (D / 2), c, step(i, c)); }
  float at(int64_t i, int64_t c) const {
    uint8_t b = q[off[i] * (D / 2) + c / 2];
    return E2M1_TABLE[(c & 1) ? b >> 4 : b & 15] * step(i, c);
  }
};
