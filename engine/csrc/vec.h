// One SIMD vector of floats and the few operations the kernels need, written once over the vector width:
// AVX-512 (16 lanes, 32 vector registers) or GCC vector extensions of 8 lanes (AVX2: 16 registers).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#if defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
typedef __m512 vf;
constexpr int64_t V = 16;
constexpr int NUM_VREGS = 32;
static inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
static inline vf vzero() { return _mm512_setzero_ps(); }
static inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
// The sum of the 16 lanes in a fixed tree (GCC's `_mm512_reduce_add_ps` order, written out so that every compiler
// gives these bits and `hsums` can match them): the 256-bit halves, then the 128-bit ones, then pairs, then the two.
static inline float hsum(vf v) {
  const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
  const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(v), hi);
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  return _mm_cvtss_f32(_mm_add_ss(q, _mm_movehdup_ps(q)));
}
// Lane t = hsum(a[t]), the same additions in the same tree, for 16 sums at the shuffle cost of about two: each stage
// adds the halves of two vectors' partial sums side by side (256-bit, 128-bit, 64-bit, then 32-bit halves).
static inline vf hsums(const vf (&a)[V]) {
  auto halves256 = [](vf x, vf y) { return _mm512_shuffle_f32x4(x, y, 0x44) + _mm512_shuffle_f32x4(x, y, 0xEE); };
  auto halves128 = [](vf x, vf y) { return _mm512_shuffle_f32x4(x, y, 0x88) + _mm512_shuffle_f32x4(x, y, 0xDD); };
  auto halves64 = [](vf x, vf y) {
    const __m512d xd = _mm512_castps_pd(x), yd = _mm512_castps_pd(y);
    return _mm512_castpd_ps(_mm512_unpacklo_pd(xd, yd)) + _mm512_castpd_ps(_mm512_unpackhi_pd(xd, yd));
  };
  auto halves32 = [](vf x, vf y) { return _mm512_shuffle_ps(x, y, 0x88) + _mm512_shuffle_ps(x, y, 0xDD); };
  vf c[4];  // c[g]'s 128-bit block b: the 4 partial sums of a[4b + g]
  for (int g = 0; g < 4; g++) c[g] = halves128(halves256(a[g], a[4 + g]), halves256(a[8 + g], a[12 + g]));
  return halves32(halves64(c[0], c[1]), halves64(c[2], c[3]));
}
// Lane-wise max(m, x) as std::max(m, x) takes it: a NaN in x leaves m.
static inline vf vmax(vf m, vf x) { return _mm512_max_ps(x, m); }
static inline float hmax(vf v) { return _mm512_reduce_max_ps(v); }
static inline void prefetch(const void* p) { _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0); }
#else
constexpr int64_t V = 8;
constexpr int NUM_VREGS = 16;
typedef float vf __attribute__((vector_size(V * sizeof(float))));
static inline vf vload(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline vf vzero() { return vf{}; }
// Spelled out where the CPU has FMA: left to the compiler, `a * b + c` is fused in one loop and not in another
// (GCC's Zen tuning splits multiply-add chains), and a row would then not get the bits of its 1-row call.
#if defined(__FMA__)
static inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
#else
static inline vf vfma(vf a, vf b, vf c) { return a * b + c; }
#endif
#if defined(__AVX2__)
// The sum of the 8 lanes in a fixed tree, ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)), which `hsums` takes for
// 8 vectors at once: a lane-by-lane chain cost an 8-row verify's attention more than its multiply-adds.
static inline float hsum(vf v) {
  const __m256 p = _mm256_hadd_ps(v, v);
  const __m256 q = _mm256_hadd_ps(p, p);
  return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(q), _mm256_extractf128_ps(q, 1)));
}
// Lane t = hsum(a[t]): pairs, then pairs of pairs (a[t]'s halves in lane t of each 128-bit half), then the halves.
static inline vf hsums(const vf (&a)[V]) {
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#else
static inline float hsum(vf v) { float s = 0; for (int k = 0; k < V; k++) s += v[k]; return s; }
static inline vf hsums(const vf (&a)[V]) { vf s; for (int t = 0; t < V; t++) s[t] = hsum(a[t]); return s; }
#endif
static inline vf vmax(vf m, vf x) { return x > m ? x : m; }
static inline float hmax(vf v) { float m = v[0]; for (int k = 1; k < V; k++) m = v[k] > m ? v[k] : m; return m; }
static inline void prefetch(const void* p) { __builtin_prefetch(p, 0, 3); }
#endif
static inline vf vset(float a) { return vzero() + a; }
// e^x, Cephes expf (~1 ulp): x = n ln2 + r (ln2 in two parts), e^r ~ 1 + r + r^2 P(r), times 2^n. AVX-512 applies
// 2^n with scalef; AVX2 has none, so 2^n (n in [-150, 128] after the clamp) goes in two halves, each a normal power
// of two: only the second multiply rounds, as scalef's one rounding does. Scalar std::exp cost 5-7 ns a lane, most
// of an 8-row verify's SiLU and softmax on AVX2.
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
static inline vf exp_reduced(vf x, vf n) {
  const vf r = vfma(n, vset(2.12194440e-4f), vfma(n, vset(-0.693359375f), x));
  vf p = vset(1.9875691500e-4f);
  for (float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    p = vfma(p, r, vset(c));
  return vfma(p, r * r, r + vset(1.0f));
}
#endif
#if defined(__AVX512F__)
static inline vf vexp(vf x) {
  x = _mm512_max_ps(_mm512_min_ps(x, vset(88.72f)), vset(-104.0f));
  const vf n = _mm512_roundscale_ps(x * vset(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT);
  return _mm512_scalef_ps(exp_reduced(x, n), n);
}
#elif defined(__AVX2__) && defined(__FMA__)
static inline vf vexp(vf x) {
  x = _mm256_max_ps(_mm256_min_ps(x, vset(88.72f)), vset(-104.0f));
  const vf n = _mm256_round_ps(x * vset(1.44269504088896341f), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1);
  auto pow2 = [](__m256i k) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  };
  return exp_reduced(x, n) * pow2(half) * pow2(_mm256_sub_epi32(ni, half));
}
#else
static inline vf vexp(vf x) { for (int k = 0; k < V; k++) x[k] = std::exp(x[k]); return x; }
#endif
// A pass that streams the weights from memory (a decode batch's or a verify's rows): with 16 vector registers (AVX2)
// a block holds one weight row, so the pass reads the weights as one sequential stream that the hardware prefetcher
// keeps ahead of (blocks of 2-4 interleaved rows made a 6-row verify cost 1.4x one row on a Zen 2), and up to
// STREAM_ROWS input rows share it.
constexpr bool STREAM_ONE_WEIGHT_ROW = NUM_VREGS < 32;
constexpr int STREAM_ROWS = 8;
// f.template operator()<M>() with M = m, for 1 <= m <= MAX: the kernels' row loops are templates over their
// input rows (registers hold M rows' accumulators), instantiated for 1 to MAX rows.
template <int MAX, class F>
inline void with_rows(int64_t m, F&& f) {
  if constexpr (MAX > 1) {
    if (m < MAX) return with_rows<MAX - 1>(m, f);
  }
  f.template operator()<MAX>();
}
// f.template operator()<M>(i) for each block of M <= MAX input rows [i, i + M) of m, in order.
template <int MAX = 4, class F>
inline void for_row_blocks(int64_t m, F&& f) {
  for (int64_t i = 0; i < m; i += MAX)
    with_rows<MAX>(std::min<int64_t>(MAX, m - i), [&]<int M>() { f.template operator()<M>(i); });
}
// Bytes [p, p + n) asked into the cache, a line at a time (a prefetch never faults: past the end is harmless).
static inline void prefetch_lines(const void* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 64) prefetch(static_cast<const char*>(p) + i);
}

#if defined(__AVX2__)
// The sum of 8 int32 lanes (exact in any order).
static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  return _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1)));
}
#endif
#if defined(__AVX512F__)
// The sums of four vectors' 16 int32 lanes, [sum(a), sum(b), sum(c), sum(d)] (exact in any order): interleaved adds
// within each 128-bit lane, then the four lanes added — a quarter of four separate reductions' shuffles.
static inline __m128i hsum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d) {
  const __m512i ab = _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
  const __m512i cd = _mm512_add_epi32(_mm512_unpacklo_epi32(c, d), _mm512_unpackhi_epi32(c, d));
  const __m512i abcd = _mm512_add_epi32(_mm512_unpacklo_epi64(ab, cd), _mm512_unpackhi_epi64(ab, cd));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(abcd), _mm512_extracti64x4_epi64(abcd, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}
#endif
static inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }

static inline float dot(const float* a, const float* b, int64_t n) {
  vf acc = vzero();
  int64_t i = 0;
  for (; i + V <= n; i += V) acc = vfma(vload(a + i), vload(b + i), acc);
  float s = hsum(acc);
  for (; i < n; i++) s = std::fma(a[i], b[i], s);  // fused alike everywhere
  return s;
}
