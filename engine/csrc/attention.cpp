// Attention of a few query rows per sequence over the paged KV cache (decode and speculative verify), GQA, each
// row bounded by its own position (and sliding window), so neither needs a mask; or draft-tree rows, each over the
// prefix and its own ancestors. Keys and values are read in place from the blocks a row's block table lists: fp32
// pools, or FP8 / NVFP4 pools decoded as the rows are walked (kv_rows.h), the values of the formats' references.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kv_rows.h"
#include "ops.h"
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

// o[:N*V] = scale * sum_i p[i] * v_keys(i)[:N*V], accumulated in N registers.
template <int N, class Rows, class Keys>
static inline void weighted_sum_regs(const float* p, float scale, const Rows& v, const Keys& keys, float* o) {
  vf acc[N];
  for (int n = 0; n < N; n++) acc[n] = vzero();
  for (int64_t i = 0; i < keys.size(); i++) {
    vf pi = vset(p[i]);
    int64_t t = keys(i);
    for (int n = 0; n < N; n++) acc[n] = vfma(pi, v.load(t, n * V), acc[n]);
  }
  for (int n = 0; n < N; n++) vstore(o + n * V, acc[n] * vset(scale));
}

// o[:D] = scale * sum_i p[i] * v_keys(i).
template <class Rows, class Keys>
static inline void weighted_sum(const float* p, float scale, const Rows& v, int64_t D, const Keys& keys, float* o) {
  switch (D % V == 0 ? D / V : 0) {
    case 2: return weighted_sum_regs<2>(p, scale, v, keys, o);
    case 4: return weighted_sum_regs<4>(p, scale, v, keys, o);
    case 8: return weighted_sum_regs<8>(p, scale, v, keys, o);
    default:
      for (int64_t c = 0; c < D; c++) o[c] = 0;
      for (int64_t i = 0; i < keys.size(); i++)
        for (int64_t c = 0; c < D; c++) o[c] += p[i] * v.at(keys(i), c);
      for (int64_t c = 0; c < D; c++) o[c] *= scale;
  }
}

// Softmax attention of one query row over `keys`; `sc` is scratch for one score per key.
template <class KRows, class VRows, class Keys>
static inline void attend(const float* q, const KRows& k, const VRows& v, int64_t D, const Keys& keys, float scale,
                          float* sc, float* o) {
  scores(q, k, D, keys, scale, sc);
  float mx = -INFINITY;
  for (int64_t i = 0; i < keys.size(); i++) mx = std::max(mx, sc[i]);
  float inv = 1.0f / exp_sum(sc, keys.size(), mx);
  weighted_sum(sc, inv, v, D, keys, o);
}

// Element offsets of positions [0, L) of each sequence in a pool [num_blocks, block_size, KV, D]: [B * L].
// Entries past a table's blocks (-1) point at block 0; no row reads them.
static std::vector<int64_t> token_offsets(const at::Tensor& table, int64_t block_size, int64_t block_stride,
                                          int64_t token_stride) {
  int64_t B = table.size(0), nb = table.size(1), L = nb * block_size;
  at::Tensor t64 = table.to(at::kLong).contiguous();
  const int64_t* T = t64.data_ptr<int64_t>();
  std::vector<int64_t> off(B * L);
  for (int64_t b = 0; b < B; b++)
    for (int64_t i = 0; i < L; i++)
      off[b * L + i] = std::max<int64_t>(T[b * nb + i / block_size], 0) * block_stride + (i % block_size) * token_stride;
  return off;
}

// The rows of a forward: q [B, S, >=H, D] (heads [0, H) used) over the pools' positions [0, L) that `rows(b, g)`
// reads ({keys, values} of sequence b, KV head g); see `decode_attention` for the rest.
template <class MakeRows>
static at::Tensor attention(const at::Tensor& q, int64_t L, const at::Tensor& pos, int64_t H, int64_t KV,
                            int64_t window, const at::Tensor& tree_base, const at::Tensor& tree_mask,
                            const MakeRows& rows) {
  TORCH_CHECK(is_f32_cpu(q) && q.stride(3) == 1 && H % KV == 0, "decode_attention: fp32 CPU q, unit stride along D");
  int64_t B = q.size(0), S = q.size(1), D = q.size(3), G = H / KV;
  TORCH_CHECK(pos.numel() == B * S, "decode_attention: one position per query row");
  const bool tree = tree_mask.numel() > 0;
  TORCH_CHECK(!tree || (window <= 0 && tree_mask.dim() == 3 && tree_mask.size(0) == B && tree_mask.size(1) == S &&
                        tree_base.numel() == B), "decode_attention: tree_mask [B, S, T], tree_base [B], no window");
  int64_t T = tree ? tree_mask.size(2) : 0;
  at::Tensor out = at::empty({B, S, H * D}, q.options());
  at::Tensor p64 = pos.to(at::kLong).contiguous();
  at::Tensor base64 = tree ? tree_base.to(at::kLong).contiguous() : p64;
  at::Tensor anc = tree ? tree_mask.to(at::kBool).contiguous() : tree_mask;
  const int64_t *P = p64.data_ptr<int64_t>(), *TB = base64.data_ptr<int64_t>();
  const bool* A = tree ? anc.data_ptr<bool>() : nullptr;
  for (int64_t b = 0; tree && b < B; b++) TORCH_CHECK(TB[b] >= 0 && TB[b] + T <= L, "decode_attention: tree past L");
  const float* Q = q.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)D);
  int64_t grain = std::max<int64_t>(1, (1 << 17) / std::max<int64_t>(1, L * D));
  at::parallel_for(0, B * S * H, grain, [&](int64_t b0, int64_t e0) {
    std::vector<float> sc(L);
    std::vector<int64_t> ancestors(T);
    for (int64_t bsh = b0; bsh < e0; bsh++) {
      int64_t bs = bsh / H, b = bs / S, s = bs % S, h = bsh % H;
      const float* qv = Q + b * q.stride(0) + s * q.stride(1) + h * q.stride(2);
      const auto [k, v] = rows(b, h / G);
      float* o = O + bs * H * D + h * D;
      if (tree) {
        int64_t n = 0;
        for (int64_t j = 0; j < T; j++)
          if (A[bs * T + j]) ancestors[n++] = TB[b] + j;
        attend(qv, k, v, D, TreeKeys{TB[b], ancestors.data(), n}, scale, sc.data(), o);
      } else {
        int64_t end = std::min<int64_t>(P[bs] + 1, L), start = window > 0 ? std::max<int64_t>(0, end - window) : 0;
        attend(qv, k, v, D, KeyRun{start, end}, scale, sc.data(), o);
      }
    }
  });
  return out;
}

// S query rows per sequence: q [B, S, >=H, D] (heads [0, H) used), keys/values the pools [N, bs, KV, D] (unit
// stride along D, K and V alike), block_table [B, nb] (sequence b's positions [i*bs, (i+1)*bs) in block
// block_table[b, i]), pos [B, S]; row (b, s) attends keys (pos[b, s] - window, pos[b, s]] (window <= 0: all up
// to pos[b, s]). A draft tree instead (tree_mask [B, S, T] bool, non-empty; tree_base [B]): row (b, s) attends
// keys [0, tree_base[b]) and tree_base[b] + j where tree_mask[b, s, j] (its ancestors and itself); no window.
// Each (row, head) is computed on its own with the same loops, so a row's output does not depend on S, B or the
// block size: a 6-row speculative verify gives bit for bit what six 1-row decode steps give. Returns [B, S, H*D].
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& block_table, const at::Tensor& pos, int64_t H, int64_t window,
                            const at::Tensor& tree_base, const at::Tensor& tree_mask) {
  TORCH_CHECK(is_f32_cpu(k) && is_f32_cpu(v) && k.dim() == 4 && k.strides() == v.strides() && k.sizes() == v.sizes() &&
              k.stride(3) == 1, "decode_attention: fp32 CPU K and V pools [N, bs, KV, D] alike, unit stride along D");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0), "decode_attention: a table row per sequence");
  int64_t bs = k.size(1), L = block_table.size(1) * bs;
  const std::vector<int64_t> off = token_offsets(block_table, bs, k.stride(0), k.stride(1));
  const float *K = k.data_ptr<float>(), *Vp = v.data_ptr<float>();
  return attention(q, L, pos, H, k.size(2), window, tree_base, tree_mask, [&](int64_t b, int64_t g) {
    return std::pair{F32Rows{K + g * k.stride(2), off.data() + b * L}, F32Rows{Vp + g * v.stride(2), off.data() + b * L}};
  });
}

// The same over packed pools (kv_rows.h): FP8 (format 3) codes [N, bs, KV, D] with the per-layer scales; NVFP4
// (format 0) codes [N, bs, KV, D/2] and E4M3 block scales [N, bs, KV, D/16] with the per-layer s2. Keys stored
// rotated need the query rotated alike (ops.py does it: q is then [B, S, H, D]).
at::Tensor decode_attention_packed(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scales,
                                   const at::Tensor& v_codes, const at::Tensor& v_scales, int64_t format,
                                   double k_scale, double v_scale, const at::Tensor& block_table, const at::Tensor& pos,
                                   int64_t H, int64_t window, const at::Tensor& tree_base, const at::Tensor& tree_mask) {
  TORCH_CHECK(format == 0 || format == 3, "decode_attention_packed: format 0 (NVFP4) or 3 (FP8)");
  TORCH_CHECK(k_codes.dim() == 4 && k_codes.is_contiguous() && v_codes.is_contiguous() &&
              k_codes.sizes() == v_codes.sizes() && k_codes.scalar_type() == at::kByte &&
              v_codes.scalar_type() == at::kByte, "decode_attention_packed: uint8 code pools [N, bs, KV, *] alike");
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == q.size(0), "decode_attention: a table row per sequence");
  int64_t D = q.size(3), bs = k_codes.size(1), KV = k_codes.size(2), L = block_table.size(1) * bs;
  TORCH_CHECK(k_codes.size(3) == (format == 3 ? D : D / 2) && (format == 3 || D % 16 == 0),
              "decode_attention_packed: code pools of the query's head_dim (NVFP4: a multiple of 16)");
  const std::vector<int64_t> off = token_offsets(block_table, bs, bs * KV, KV);  // token rows, times a row's width
  const uint8_t *Kc = k_codes.data_ptr<uint8_t>(), *Vc = v_codes.data_ptr<uint8_t>();
  if (format == 3)
    return attention(q, L, pos, H, KV, window, tree_base, tree_mask, [&](int64_t b, int64_t g) {
      return std::pair{Fp8Rows{Kc + g * D, off.data() + b * L, D, (float)k_scale},
                       Fp8Rows{Vc + g * D, off.data() + b * L, D, (float)v_scale}};
    });
  TORCH_CHECK(k_scales.is_contiguous() && v_scales.is_contiguous() && k_scales.numel() == k_codes.numel() / 8 &&
              v_scales.sizes() == k_scales.sizes(), "decode_attention_packed: NVFP4 scale pools [N, bs, KV, D/16]");
  const uint8_t *Ks = k_scales.data_ptr<uint8_t>(), *Vs = v_scales.data_ptr<uint8_t>();
  return attention(q, L, pos, H, KV, window, tree_base, tree_mask, [&](int64_t b, int64_t g) {
    return std::pair{Nvfp4Rows{Kc + g * D / 2, Ks + g * D / 16, off.data() + b * L, D, (float)k_scale},
                     Nvfp4Rows{Vc + g * D / 2, Vs + g * D / 16, off.data() + b * L, D, (float)v_scale}};
  });
}
