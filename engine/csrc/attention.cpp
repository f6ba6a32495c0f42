// Attention of a few query rows per sequence over the paged KV cache (decode and speculative verify), GQA, each
// row bounded by its own position (and sliding window), so neither needs a mask; or draft-tree rows, each over the
// prefix and its own ancestors. Keys and values are read in place from the blocks a row's block table lists: fp32
// pools, or FP8 / NVFP4 pools decoded as the rows are walked (kv_rows.h), the values of the formats' references.
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <tuple>
#include <vector>

#include "attend.h"
#include "kv_rows.h"
#include "ops.h"
#include "vec.h"

// Where each sequence's positions [0, L) lie in a pool [num_blocks, block_size, KV, D]: `cache[b]`, the first b'
// whose block-table row equals b's, so rows that read the same cache are known (a ragged batch gives each token of
// a prompt chunk its own row of the table); and `offsets(b)`, element offsets of its positions, filled once per
// distinct row (entries past a table's blocks, -1, point at block 0; no row reads them).
struct Layout {
  std::vector<int64_t> off, cache, slot;  // off [distinct rows, L]; slot[b]: cache[b]'s row of `off`
  int64_t L;
  const int64_t* offsets(int64_t b) const { return off.data() + slot[b] * L; }
};

static Layout layout(const at::Tensor& table, int64_t block_size, int64_t block_stride, int64_t token_stride) {
  int64_t B = table.size(0), nb = table.size(1);
  at::Tensor t64 = table.to(at::kLong).contiguous();
  const int64_t* T = t64.data_ptr<int64_t>();
  Layout out{{}, std::vector<int64_t>(B), std::vector<int64_t>(B), nb * block_size};
  std::vector<int64_t> distinct;  // the b that start a cache
  for (int64_t b = 0; b < B; b++) {
    out.cache[b] = b, out.slot[b] = distinct.size();
    for (size_t u = 0; u < distinct.size(); u++)
      if (std::equal(T + b * nb, T + (b + 1) * nb, T + distinct[u] * nb)) {
        out.cache[b] = distinct[u], out.slot[b] = u;
        break;
      }
    if (out.cache[b] == b) distinct.push_back(b);
  }
  out.off.resize(distinct.size() * out.L);
  for (size_t u = 0; u < distinct.size(); u++)
    for (int64_t i = 0; i < out.L; i++)
      out.off[u * out.L + i] =
          std::max<int64_t>(T[distinct[u] * nb + i / block_size], 0) * block_stride + (i % block_size) * token_stride;
  return out;
}

// One query row (b, s, h) of a forward: its keys' first index and count, and what it may share keys with.
struct QueryRow {
  int64_t cache, group, first, size, bs, h;
  auto order() const { return std::tie(cache, group, first, size); }
};

// Keys x rows of tile t (rows qrows[tiles[t], tiles[t + 1]); sorted, the last reads the most keys).
static int64_t tile_work(const std::vector<QueryRow>& qrows, const std::vector<int64_t>& tiles, int64_t t) {
  return qrows[tiles[t + 1] - 1].size * (tiles[t + 1] - tiles[t]);
}

// How threads share a forward's tiles: `parts` threads (one per 64k key-dims of work, at most all of them) take runs
// of tiles as they come free, the largest first (`order`). A run is one cache's consecutive tiles (a decode row's KV
// heads, whose keys lie side by side in the blocks), cut at a quarter of a thread's share. Equal halves by count
// left one thread with a step's decode rows (keys read from memory) and the other with its prompt rows (keys just
// written, in cache); single tiles dealt alternately split a sequence's blocks between the threads.
struct Runs {
  std::vector<int64_t> bounds, order;  // run i: tiles [bounds[i], bounds[i + 1])
  int64_t parts;
};

static Runs plan_runs(const std::vector<QueryRow>& qrows, const std::vector<int64_t>& tiles, int64_t D) {
  const int64_t num_tiles = tiles.size() - 1;
  int64_t total = 0;  // keys x rows
  for (int64_t t = 0; t < num_tiles; t++) total += tile_work(qrows, tiles, t);
  Runs runs{{0}, {}, std::clamp<int64_t>(total * D >> 16, 1, at::get_num_threads())};
  const int64_t cap = std::max<int64_t>(1, total / (4 * runs.parts));
  std::vector<int64_t> work{0};
  for (int64_t t = 0; t < num_tiles; t++) {
    if (t > runs.bounds.back() && (qrows[tiles[t]].cache != qrows[tiles[t - 1]].cache || work.back() >= cap)) {
      runs.bounds.push_back(t);
      work.push_back(0);
    }
    work.back() += tile_work(qrows, tiles, t);
  }
  runs.bounds.push_back(num_tiles);
  runs.order.resize(work.size());
  for (size_t i = 0; i < work.size(); i++) runs.order[i] = i;
  std::stable_sort(runs.order.begin(), runs.order.end(), [&](int64_t x, int64_t y) { return work[x] > work[y]; });
  return runs;
}

// The rows of a forward: q [B, S, >=H, D] (heads [0, H) used) over the pools' positions [0, L) that `rows(b, g)`
// reads ({keys, values} of sequence b, KV head g); `cache` from `layout`; see `decode_attention` for the rest.
template <class MakeRows>
static at::Tensor attention(const at::Tensor& q, int64_t L, const at::Tensor& pos, int64_t H, int64_t KV,
                            int64_t window, const at::Tensor& tree_base, const at::Tensor& tree_mask,
                            const std::vector<int64_t>& cache, const MakeRows& rows) {
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
  // Rows sorted so that those sharing keys (cache, KV head, first key) sit together, nearest in length together.
  std::vector<QueryRow> qrows;
  for (int64_t bs = 0; bs < B * S; bs++) {
    const int64_t b = bs / S;
    int64_t first = TB[b], size = TB[b];  // a tree row: the prefix [0, base), then its ancestors
    if (tree) {
      size += std::count(A + bs * T, A + (bs + 1) * T, true);
    } else {
      const int64_t end = std::min<int64_t>(P[bs] + 1, L);
      first = window > 0 ? std::max<int64_t>(0, end - window) : 0, size = end - first;
    }
    for (int64_t h = 0; h < H; h++) qrows.push_back({cache[b], h / G, first, size, bs, h});
  }
  std::sort(qrows.begin(), qrows.end(), [](const QueryRow& x, const QueryRow& y) { return x.order() < y.order(); });
  std::vector<int64_t> tiles;  // tile i: qrows [tiles[i], tiles[i + 1])
  for (int64_t i = 0; i < (int64_t)qrows.size(); i++) {
    const QueryRow& r = qrows[i];
    bool joins = !tiles.empty() && i - tiles.back() < QT && qrows[tiles.back()].cache == r.cache &&
                 qrows[tiles.back()].group == r.group && qrows[tiles.back()].first == r.first;
    if (!joins) tiles.push_back(i);
  }
  tiles.push_back(qrows.size());
  const float* Q = q.data_ptr<float>();
  float* O = out.data_ptr<float>();
  const float scale = 1.0f / std::sqrt((float)D);
  const Runs runs = plan_runs(qrows, tiles, D);
  std::atomic<int64_t> next{0};
  at::parallel_for(0, runs.parts, 1, [&](int64_t, int64_t) {
    std::vector<float> sc(QT * L);
    std::vector<int64_t> ancestors(QT * T);
    const int64_t num_runs = runs.order.size();
    for (int64_t u = next++; u < num_runs; u = next++) {
      const int64_t run = runs.order[u];
      for (int64_t t = runs.bounds[run]; t < runs.bounds[run + 1]; t++) {
        const int nq = tiles[t + 1] - tiles[t];
        const QueryRow* r = &qrows[tiles[t]];
        const float* qv[QT];
        float* o[QT];
        for (int j = 0; j < nq; j++) {
          const int64_t b = r[j].bs / S, s = r[j].bs % S;
          qv[j] = Q + b * q.stride(0) + s * q.stride(1) + r[j].h * q.stride(2);
          o[j] = O + r[j].bs * H * D + r[j].h * D;
        }
        const auto [k, v] = rows(r[0].bs / S, r[0].group);  // the tile's rows read the same cache
        if (tree) {
          TreeKeys keys[QT];
          for (int j = 0; j < nq; j++) {
            int64_t n = 0, *anc_j = ancestors.data() + j * T, bs = r[j].bs;
            for (int64_t c = 0; c < T; c++)
              if (A[bs * T + c]) anc_j[n++] = r[j].first + c;
            keys[j] = TreeKeys{r[j].first, anc_j, n};
          }
          attend_rows(nq, qv, k, v, D, keys, r[0].first, scale, sc.data(), L, o);
        } else {
          KeyRun keys[QT];
          for (int j = 0; j < nq; j++) keys[j] = KeyRun{r[j].first, r[j].first + r[j].size};
          attend_rows(nq, qv, k, v, D, keys, r[0].size, scale, sc.data(), L, o);  // sorted: the shortest first
        }
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
  const Layout lay = layout(block_table, bs, k.stride(0), k.stride(1));
  const float *K = k.data_ptr<float>(), *Vp = v.data_ptr<float>();
  return attention(q, L, pos, H, k.size(2), window, tree_base, tree_mask, lay.cache, [&](int64_t b, int64_t g) {
    return std::pair{F32Rows{K + g * k.stride(2), lay.offsets(b)}, F32Rows{Vp + g * v.stride(2), lay.offsets(b)}};
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
  const Layout lay = layout(block_table, bs, bs * KV, KV);  // token rows, times a row's width
  const uint8_t *Kc = k_codes.data_ptr<uint8_t>(), *Vc = v_codes.data_ptr<uint8_t>();
  if (format == 3)
    return attention(q, L, pos, H, KV, window, tree_base, tree_mask, lay.cache, [&](int64_t b, int64_t g) {
      return std::pair{Fp8Rows{Kc + g * D, lay.offsets(b), D, (float)k_scale},
                       Fp8Rows{Vc + g * D, lay.offsets(b), D, (float)v_scale}};
    });
  TORCH_CHECK(k_scales.is_contiguous() && v_scales.is_contiguous() && k_scales.numel() == k_codes.numel() / 8 &&
              v_scales.sizes() == k_scales.sizes(), "decode_attention_packed: NVFP4 scale pools [N, bs, KV, D/16]");
  const uint8_t *Ks = k_scales.data_ptr<uint8_t>(), *Vs = v_scales.data_ptr<uint8_t>();
  return attention(q, L, pos, H, KV, window, tree_base, tree_mask, lay.cache, [&](int64_t b, int64_t g) {
    return std::pair{Nvfp4Rows{Kc + g * D / 2, Ks + g * D / 16, lay.offsets(b), D, (float)k_scale},
                     Nvfp4Rows{Vc + g * D / 2, Vs + g * D / 16, lay.offsets(b), D, (float)v_scale}};
  });
}
