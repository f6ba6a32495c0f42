// Softmax attention of query rows over their keys, the arithmetic of attention.cpp's kernel: one row (`attend`)
// or up to QT rows that read the same keys and values (`attend_rows`), each row computed with the same operations
// in the same order either way. `KRows`/`VRows` read a KV head's pool (kv_rows.h); `Keys` lists a row's keys.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vec.h"

// y[j] = e^(x[j] - shift) for j < n; returns their sum.
static inline float exp_sum(float* x, int64_t n, float shift) {
  vf acc = vzero(), sh = vset(shift);
  int64_t j = 0;
  for (; j + V <= n; j += V) {
    vf e = vexp(vload(x + j) - sh);
    vstore(x + j, e);
    acc += e;
  }
  float s = hsum(acc);
  for (; j < n; j++) s += (x[j] = std::exp(x[j] - shift));
  return s;
}

// The cache indices of one query row's keys, i in [0, size()): a contiguous run for decode and chain-verify
// rows; the prefix [0, base) then the row's ancestors for a draft-tree row. Either way the same loops run over
// them in the same order, so a tree row gives bit for bit what a decode step over its compacted path gives.
struct KeyRun {
  int64_t start, end;
  int64_t size() const { return end - start; }
  int64_t operator()(int64_t i) const { return start + i; }
};
struct TreeKeys {
  int64_t base;
  const int64_t* ancestors;  // cache indices of the row's ancestors (itself included), ascending
  int64_t n;
  int64_t size() const { return base + n; }
  int64_t operator()(int64_t i) const { return i < base ? i : ancestors[i - base]; }
};

// dot(q, k_t) over D, in `dot`'s order (vector lanes, their sum, then the tail). The tail's fused multiply-adds
// are spelled out: left to the compiler, they were contracted for one reader and not for another.
template <class Rows>
static inline float row_dot(const float* q, const Rows& k, int64_t t, int64_t D) {
  vf acc = vzero();
  int64_t c = 0;
  for (; c + V <= D; c += V) acc = vfma(vload(q + c), k.load(t, c), acc);
  float s = hsum(acc);
  for (; c < D; c++) s = std::fma(q[c], k.at(t, c), s);
  return s;
}

// s[i] = dot(q, k_keys(i)) * scale: four keys at a time.
template <class Rows, class Keys>
static inline void scores(const float* q, const Rows& k, int64_t D, const Keys& keys, float scale, float* s) {
  int64_t i = 0, n = keys.size();
  if (D % V == 0) {
    for (; i + 4 <= n; i += 4) {
      int64_t t0 = keys(i), t1 = keys(i + 1), t2 = keys(i + 2), t3 = keys(i + 3);
      vf a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
      for (int64_t c = 0; c < D; c += V) {
        vf qv = vload(q + c);
        a0 = vfma(qv, k.load(t0, c), a0);
        a1 = vfma(qv, k.load(t1, c), a1);
        a2 = vfma(qv, k.load(t2, c), a2);
        a3 = vfma(qv, k.load(t3, c), a3);
      }
      s[i] = hsum(a0) * scale, s[i + 1] = hsum(a1) * scale, s[i + 2] = hsum(a2) * scale, s[i + 3] = hsum(a3) * scale;
    }
  }
  for (; i < n; i++) s[i] = row_dot(q, k, keys(i), D) * scale;
}

// o[:D] = scale * sum_i p[i] * v_keys(i), one value at a time (rows of 2, 4 or 8 whole vectors go through
// `attend_tile`, which keeps them in registers).
template <class Rows, class Keys>
static inline void weighted_sum(const float* p, float scale, const Rows& v, int64_t D, const Keys& keys, float* o) {
  for (int64_t c = 0; c < D; c++) o[c] = 0;
  for (int64_t i = 0; i < keys.size(); i++)
    for (int64_t c = 0; c < D; c++) o[c] += p[i] * v.at(keys(i), c);
  for (int64_t c = 0; c < D; c++) o[c] *= scale;
}

// s[i] = e^(s[i] - max(s)) for i < n; returns 1 / their sum (the softmax's normaliser).
static inline float softmax_unnormalised(float* s, int64_t n) {
  vf m = vset(-INFINITY);
  int64_t i = 0;
  for (; i + V <= n; i += V) m = vmax(m, vload(s + i));
  float mx = hmax(m);  // the max is exact in any order
  for (; i < n; i++) mx = std::max(mx, s[i]);
  return 1.0f / exp_sum(s, n, mx);
}

// Softmax attention of one query row over `keys`; `sc` is scratch for one score per key.
template <class KRows, class VRows, class Keys>
static inline void attend(const float* q, const KRows& k, const VRows& v, int64_t D, const Keys& keys, float scale,
                          float* sc, float* o) {
  scores(q, k, D, keys, scale, sc);
  weighted_sum(sc, softmax_unnormalised(sc, keys.size()), v, D, keys, o);
}

// Query rows that read the same keys and values: one KV head of one sequence (its G query heads, and every row of
// that sequence in the forward: a verify's, or a prompt chunk's), so up to QT of them share each key and value
// vector loaded (and, in FP8/NVFP4 pools, decoded). Each row's numbers are `attend`'s, operation for operation: its
// scores, max, exp_sum and weighted sum run over its own keys in the same order, only interleaved with the others'.
constexpr int QT = 4;

// NQ rows whose keys agree on indices [0, common) (keys[0] gives them); `sc` scratch [NQ, L] scores.
template <int NQ, int N, class KRows, class VRows, class Keys>
static void attend_tile(const float* const* q, const KRows& k, const VRows& v, const Keys* keys, int64_t common,
                        float scale, float* sc, int64_t L, float* const* o) {
  constexpr int64_t D = N * V;
  // The shared keys' scores, KB keys a pass: NQ x KB dot products whose lane sums `hsums` takes together.
  constexpr int KB = V / NQ;
  int64_t i = 0;
  for (; i + KB <= common; i += KB) {
    int64_t t[KB];
    for (int u = 0; u < KB; u++) t[u] = keys[0](i + u);
    vf a[V];  // a[j * KB + u]: row j, key i + u
    for (int u = 0; u < V; u++) a[u] = vzero();
    for (int64_t c = 0; c < D; c += V) {
      vf qc[NQ];
      for (int j = 0; j < NQ; j++) qc[j] = vload(q[j] + c);
      for (int u = 0; u < KB; u++) {
        const vf kc = k.load(t[u], c);
        for (int j = 0; j < NQ; j++) a[j * KB + u] = vfma(qc[j], kc, a[j * KB + u]);
      }
    }
    alignas(64) float s[V];
    vstore(s, hsums(a) * vset(scale));
    for (int j = 0; j < NQ; j++)
      for (int u = 0; u < KB; u++) sc[j * L + i + u] = s[j * KB + u];
  }
  for (; i < common; i++) {
    const int64_t t = keys[0](i);
    vf a[NQ];
    for (int j = 0; j < NQ; j++) a[j] = vzero();
    for (int64_t c = 0; c < D; c += V) {
      const vf kc = k.load(t, c);
      for (int j = 0; j < NQ; j++) a[j] = vfma(vload(q[j] + c), kc, a[j]);
    }
    for (int j = 0; j < NQ; j++) sc[j * L + i] = hsum(a[j]) * scale;
  }
  float inv[NQ];
  for (int j = 0; j < NQ; j++) {
    float* s = sc + j * L;
    const int64_t n = keys[j].size();
    for (int64_t i = common; i < n; i++) s[i] = row_dot(q[j], k, keys[j](i), D) * scale;
    inv[j] = softmax_unnormalised(s, n);
  }
  vf acc[NQ][N];
  for (int j = 0; j < NQ; j++)
    for (int n = 0; n < N; n++) acc[j][n] = vzero();
  for (int64_t i = 0; i < common; i++) {
    const int64_t t = keys[0](i);
    for (int n = 0; n < N; n++) {
      const vf vv = v.load(t, n * V);
      for (int j = 0; j < NQ; j++) acc[j][n] = vfma(vset(sc[j * L + i]), vv, acc[j][n]);
    }
  }
  for (int j = 0; j < NQ; j++) {
    for (int64_t i = common; i < keys[j].size(); i++) {
      const vf pi = vset(sc[j * L + i]);
      const int64_t t = keys[j](i);
      for (int n = 0; n < N; n++) acc[j][n] = vfma(pi, v.load(t, n * V), acc[j][n]);
    }
    for (int n = 0; n < N; n++) vstore(o[j] + n * V, acc[j][n] * vset(inv[j]));
  }
}

// `attend_tile` for nq <= QT rows, where D is 2, 4 or 8 vectors (else each row through `attend`).
template <class KRows, class VRows, class Keys>
static void attend_rows(int nq, const float* const* q, const KRows& k, const VRows& v, int64_t D, const Keys* keys,
                        int64_t common, float scale, float* sc, int64_t L, float* const* o) {
#define OPTISERVE_TILE(NQ, N) return attend_tile<NQ, N>(q, k, v, keys, common, scale, sc, L, o)
#define OPTISERVE_TILES(N)                        \
  switch (nq) {                                   \
    case 1: OPTISERVE_TILE(1, N);                 \
    case 2: OPTISERVE_TILE(2, N);                 \
    case 3: OPTISERVE_TILE(3, N);                 \
    default: OPTISERVE_TILE(QT, N);               \
  }
  static_assert(QT == 4);
  switch (D % V == 0 ? D / V : 0) {
    case 2: OPTISERVE_TILES(2);
    case 4: OPTISERVE_TILES(4);
    case 8: OPTISERVE_TILES(8);
    default:
      for (int j = 0; j < nq; j++) attend(q[j], k, v, D, keys[j], scale, sc, o[j]);
  }
#undef OPTISERVE_TILES
#undef OPTISERVE_TILE
}
