// INT8 code products on AMX tiles (Intel AMX-INT8: Sapphire Rapids and later), for `int8_integer_linear` from
// AMX_MIN_ROWS_INT8 input rows on (prompt chunks, large verifies and batches): one `tdpbssd` multiplies a
// 16 x 64 block of input codes by 64 x 16 weight codes into 16 x 16 int32 sums, 16x the products of an AVX-512
// `vpdpbusd`. The sums are exact integers, so they are the VNNI loop's sums whatever the order: every row keeps
// the bits of a one-row call.
//
// A tile multiply wants the weights as 4-code groups of 16 outputs side by side (B[k/4][16 outputs][4 codes]);
// the codes are stored [outputs, k] for the one-row kernels, so each thread regroups a strip of 16 outputs at a
// time into a small buffer and runs every input row against it before the next strip.
#include <algorithm>
#include <cstring>
#include <vector>

#include "packed_ops.h"

#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

namespace {
constexpr int64_t TILE = 16;     // rows of an input or sum tile; outputs of a weight tile
constexpr int64_t TILE_K = 64;   // codes along k a tile multiply takes

struct TileConfig {  // the `ldtilecfg` operand, palette 1
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Linux hands the tile registers to a process only when it asks (once; the grant covers all its threads).
bool request_tile_state() {
  constexpr long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

// A 16 x 16 matrix of int32 (a row a register) transposed in place: unpacks, then 128-bit lane shuffles.
inline void transpose16(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 8; i++) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  for (int i = 0; i < 4; i++) {
    r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
    r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
    r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
  }
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 4; j++) {
      t[8 * i + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0x88);
      t[8 * i + 4 + j] = _mm512_shuffle_i32x4(r[8 * i + j], r[8 * i + 4 + j], 0xdd);
    }
  for (int j = 0; j < 8; j++) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// Outputs [r, r + 16) of W [n, k] as a weight tile operand per 64 codes: B[g][j] = the 4 codes W[r + j, 4g .. 4g + 3]
// as one int32, g < kp / 4; outputs past n and codes past k are 0 (they add nothing to a sum). A whole strip's
// 64-code blocks are 16 x 16 int32 transposes.
void regroup_strip(const int8_t* W, int64_t r, int64_t n, int64_t k, int64_t kp, int32_t* B) {
  const bool whole = r + TILE <= n;
  const int64_t blocks = whole ? k / TILE_K * TILE_K : 0;
  if (!whole || blocks < kp) std::memset(B, 0, kp / 4 * TILE * sizeof(int32_t));
  for (int64_t t = 0; t < blocks; t += TILE_K) {
    __m512i rows[TILE];
    for (int64_t j = 0; j < TILE; j++) rows[j] = _mm512_loadu_si512(W + (r + j) * k + t);
    transpose16(rows);
    for (int64_t g = 0; g < TILE; g++) _mm512_storeu_si512(B + (t / 4 + g) * TILE, rows[g]);
  }
  for (int64_t j = 0; j < TILE && r + j < n; j++) {
    const int8_t* w = W + (r + j) * k;
    int64_t g = blocks / 4;
    for (; 4 * g + 4 <= k; g++) std::memcpy(B + g * TILE + j, w + 4 * g, 4);
    if (4 * g < k) std::memcpy(B + g * TILE + j, w + 4 * g, k - 4 * g);
  }
}

// A tile of sums into S: rows [i, i + 16) x outputs [r, r + 16), those below m and n.
void store_sums(const int32_t (&C)[TILE][TILE], int64_t i, int64_t m, int64_t r, int64_t n, int32_t* S,
                int64_t out_stride) {
  if (r >= n) return;
  for (int64_t a = 0; a < TILE && i + a < m; a++)
    std::memcpy(S + (i + a) * out_stride + r, C[a], std::min(TILE, n - r) * sizeof(int32_t));
}

// INT4 W4A8's packed pairs [q0, q0 + 8) of W [pairs, k] (output 2q in the low nibble of each byte, 2q + 1 in the
// high one, a 4-bit two's complement code) as a weight tile operand: the codes sign-extended to bytes, outputs in
// order, then regrouped as `regroup_strip` does; pairs past `pairs` and codes past k are 0.
void regroup_w4_strip(const uint8_t* W, int64_t q0, int64_t pairs, int64_t k, int64_t kp, int32_t* B) {
  const __m512i low = _mm512_set1_epi8(0x0F), eight = _mm512_set1_epi8(8);
  auto widen = [&](__m512i nibbles) { return _mm512_sub_epi8(_mm512_xor_si512(nibbles, eight), eight); };
  for (int64_t t = 0; t < kp; t += TILE_K) {
    const __mmask64 in_row = t + TILE_K <= k ? ~0ULL : (1ULL << (k - t)) - 1;  // kp - k < 64
    __m512i rows[TILE];
    for (int64_t j = 0; j < TILE / 2; j++) {
      const __m512i v = q0 + j < pairs ? _mm512_maskz_loadu_epi8(in_row, W + (q0 + j) * k + t) : _mm512_setzero_si512();
      rows[2 * j] = widen(_mm512_and_si512(v, low));
      rows[2 * j + 1] = widen(_mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
    transpose16(rows);
    for (int64_t g = 0; g < TILE; g++) _mm512_storeu_si512(B + (t / 4 + g) * TILE, rows[g]);
  }
}

// y[a][o] += float(S[a][o]) * (xs[row a, g] * ws[output o, g]) for a 16 x 16 tile of group sums: two roundings and
// an add, in the one-row kernel's order (no fused multiply-add).
__attribute__((optimize("fp-contract=off"))) void add_group(const int32_t (&S)[TILE][TILE], float (&y)[TILE][TILE],
                                                            const float* xs, const float* ws, int64_t G, int64_t g,
                                                            int64_t rows, int64_t outs) {
  for (int64_t a = 0; a < rows; a++)
    for (int64_t o = 0; o < outs; o++) y[a][o] = y[a][o] + (float)S[a][o] * (xs[a * G + g] * ws[o * G + g]);
}
// The 2 x 2 sum tiles of input rows [i, i + 32) (the second 16 only if `second`) by the two weight strips B0, B1
// over codes [t0, t1): S[c] for row tile c / 2 and strip c % 2. 4 sum, 2 input and 2 weight tiles: all 8.
void tile_sums(const int8_t* A, int64_t i, int64_t lda, const int32_t* B0, const int32_t* B1, int64_t t0, int64_t t1,
               bool second, int32_t (&S)[4][TILE][TILE]) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t t = t0; t < t1; t += TILE_K) {
    _tile_loadd(4, A + i * lda + t, lda);
    _tile_loadd(6, B0 + t / 4 * TILE, TILE_K);
    _tile_loadd(7, B1 + t / 4 * TILE, TILE_K);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if (second) {
      _tile_loadd(5, A + (i + TILE) * lda + t, lda);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, S[0], TILE_K);
  _tile_stored(1, S[1], TILE_K);
  if (second) {
    _tile_stored(2, S[2], TILE_K);
    _tile_stored(3, S[3], TILE_K);
  }
}

void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; t++) cfg.rows[t] = TILE, cfg.bytes_per_row[t] = TILE_K;
  _tile_loadconfig(&cfg);
}
}  // namespace

bool amx_int8_available() {
  static const bool granted = request_tile_state();
  return granted;
}

void amx_w4a8(const int8_t* A, int64_t m, int64_t ldq, const float* xs, int64_t G, const uint8_t* W, int64_t pairs,
              int64_t k, const float* ws, const float* b, float* Y, int64_t ldy) {
  load_tile_config();
  const int64_t n = 2 * pairs;
  std::vector<int32_t> B(2 * ldq / 4 * TILE);
  int32_t* B0 = B.data();
  int32_t* B1 = B0 + ldq / 4 * TILE;
  alignas(64) int32_t S[4][TILE][TILE];
  float y[4][TILE][TILE];  // the four sum tiles' outputs, summed over the groups
  for (int64_t r = 0; r < n; r += 2 * TILE) {
    regroup_w4_strip(W, r / 2, pairs, k, ldq, B0);
    regroup_w4_strip(W, r / 2 + TILE / 2, pairs, k, ldq, B1);
    for (int64_t i = 0; i < m; i += 2 * TILE) {
      const bool second = i + TILE < m;
      const int tiles = second ? 4 : 2;
      std::memset(y, 0, sizeof y);
      for (int64_t g = 0; g < G; g++) {
        tile_sums(A, i, ldq, B0, B1, g * W4A8_GROUP, std::min((g + 1) * W4A8_GROUP, ldq), second, S);
        for (int c = 0; c < tiles; c++) {
          const int64_t i0 = i + c / 2 * TILE, o0 = r + c % 2 * TILE;
          if (o0 < n)
            add_group(S[c], y[c], xs + i0 * G, ws + o0 * G, G, g, std::min(TILE, m - i0), std::min(TILE, n - o0));
        }
      }
      for (int c = 0; c < tiles; c++) {
        const int64_t i0 = i + c / 2 * TILE, o0 = r + c % 2 * TILE;
        for (int64_t a = 0; a < std::min(TILE, m - i0); a++)
          for (int64_t o = 0; o < std::min(TILE, n - o0); o++)
            Y[(i0 + a) * ldy + o0 + o] = b ? y[c][a][o] + b[o0 + o] : y[c][a][o];
      }
    }
  }
  _tile_release();
}

// Two weight strips (32 outputs) against two input tiles (32 rows) per pass over k (`tile_sums`).
void amx_int8_sums(const int8_t* A, int64_t m, int64_t kp, const int8_t* W, int64_t n, int64_t k, int32_t* S,
                   int64_t out_stride) {
  load_tile_config();
  std::vector<int32_t> B(2 * kp / 4 * TILE);
  int32_t* B0 = B.data();
  int32_t* B1 = B0 + kp / 4 * TILE;
  alignas(64) int32_t C[4][TILE][TILE];
  for (int64_t r = 0; r < n; r += 2 * TILE) {
    regroup_strip(W, r, n, k, kp, B0);
    regroup_strip(W, r + TILE, n, k, kp, B1);
    for (int64_t i = 0; i < m; i += 2 * TILE) {
      const bool second = i + TILE < m;  // a second input tile (A holds rows up to m rounded up to 16)
      tile_sums(A, i, kp, B0, B1, 0, kp, second, C);
      for (int c = 0; c < (second ? 4 : 2); c++)
        store_sums(C[c], i + c / 2 * TILE, m, r + c % 2 * TILE, n, S, out_stride);
    }
  }
  _tile_release();
}

#else

bool amx_int8_available() { return false; }

void amx_int8_sums(const int8_t*, int64_t, int64_t, const int8_t*, int64_t, int64_t, int32_t*, int64_t) {
  TORCH_CHECK(false, "amx_int8_sums: this build has no AMX-INT8");
}

void amx_w4a8(const int8_t*, int64_t, int64_t, const float*, int64_t, const uint8_t*, int64_t, int64_t,
              const float*, const float*, float*, int64_t) {
  TORCH_CHECK(false, "amx_w4a8: this build has no AMX-INT8");
}

#endif
