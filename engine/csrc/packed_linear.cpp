// y = x @ W.T (+ b) in fp32 for a weight held packed (NVFP4, INT4, INT8, FP8) or in bf16, as one shard or several written side
// by side (fused q/k/v, gate/up). Up to DIRECT_MAX_ROWS input rows (decode, verify), each weight vector is decoded
// in registers (packed_decode.h) and multiplied at once: a decoded tile written and read back cost more than the
// products at batch 1. More input rows (prefill) share a per-thread tile of a few decoded weight rows that stays in
// L1/L2. Either way the weight is read packed once per pass and no fp32 copy of it is ever held.
// Every output is one dot product accumulated alone, in a fixed order (vector lanes along k, their sum, the bias,
// then the tail), whatever the number of input rows, the path and however the tiles fall, so an n-row call
// (speculative verify) gives each row bit for bit what a 1-row call (decode) gives. NVFP4 on AVX-512 takes its
// weights two blocks a decode and x reordered to match (`nvfp4_pair_order`), on every path alike.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "packed_decode.h"
#include "packed_ops.h"
#include "vec.h"

enum Format : int64_t { NVFP4 = 0, INT4 = 1, INT8 = 2, FP8 = 3, BF16 = 4 };

constexpr int64_t TILE_BYTES = 32 * 1024;  // decoded rows per tile: what fits in L1 beside x

struct Shard {
  const uint8_t* codes;
  const uint8_t* scales;  // E4M3 bits (NVFP4) or fp32 (INT4 [rows, G], INT8 [rows]); unused for BF16
  float tensor_scale;     // s2 (NVFP4), the FP8 scale; unused for INT4 / INT8 / BF16
  int64_t rows, col0;
};

struct Tile {
  int64_t shard, row0, rows;
};

// Decode weight rows [r0, r0 + n) of `s` into `dst` (row stride ld >= k rounded up to 16).
static void decode_rows(Format fmt, const Shard& s, int64_t r0, int64_t n, int64_t k, int64_t group, float* dst,
                        int64_t ld) {
  const float* fscale = reinterpret_cast<const float*>(s.scales);
  if (fmt == NVFP4) {
    int64_t nb = (k + 15) / 16;
    for (int64_t r = 0; r < n; r++)
      decode_nvfp4_row(s.codes + (r0 + r) * nb * 8, s.scales + (r0 + r) * nb, s.tensor_scale, nb, k, dst + r * ld);
  } else if (fmt == INT4) {  // r0 and n are even: rows come in the pairs a byte holds
    int64_t groups = (k + group - 1) / group;
    for (int64_t r = 0; r < n; r += 2) {
      const float* se = fscale + (r0 + r) * groups;
      decode_int4_pair(s.codes + (r0 + r) / 2 * k, se, se + groups, k, group, dst + r * ld, dst + (r + 1) * ld);
    }
  } else if (fmt == INT8) {
    for (int64_t r = 0; r < n; r++)
      decode_int8_row(reinterpret_cast<const int8_t*>(s.codes) + (r0 + r) * k, fscale[r0 + r], k, dst + r * ld);
  } else if (fmt == FP8) {
    for (int64_t r = 0; r < n; r++) decode_fp8_row(s.codes + (r0 + r) * k, s.tensor_scale, k, dst + r * ld);
  } else {
    for (int64_t r = 0; r < n; r++)
      decode_bf16_row(reinterpret_cast<const uint16_t*>(s.codes) + (r0 + r) * k, k, dst + r * ld);
  }
}

// Y[m * ldy + r] = dot(X[m, :k], W_r[:k]) + b[r] for R weight rows and M input rows: R * M accumulators. `w.vec(r, i)`
// gives row r's V weights from i, `w.at(r, j)` one weight (the tail past the last full vector): a decoded tile or
// the packed rows decoded in registers, the same values either way, multiplied in the same order.
template <int R, int M, class Weights>
static inline void dot_block(const Weights& w, const float* X, int64_t k, const float* b, float* Y, int64_t ldy) {
  vf acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = vzero();
  int64_t i = 0;
  if constexpr (Weights::PAIRS) {  // two vectors from one decode, multiplied in the order a tile would be
    for (; i + 2 * V <= k; i += 2 * V) {
      vf xe[M], xo[M];
      for (int m = 0; m < M; m++) xe[m] = vload(X + m * k + i), xo[m] = vload(X + m * k + i + V);
      for (int r = 0; r < R; r++) {
        vf even, odd;
        w.vec2(r, i, even, odd);
        for (int m = 0; m < M; m++) acc[r][m] = vfma(odd, xo[m], vfma(even, xe[m], acc[r][m]));
      }
    }
  }
  for (; i + V <= k; i += V) {
    vf xv[M];
    for (int m = 0; m < M; m++) xv[m] = vload(X + m * k + i);
    for (int r = 0; r < R; r++) {
      vf wv = w.vec(r, i);
      for (int m = 0; m < M; m++) acc[r][m] = vfma(wv, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      float s = hsum(acc[r][m]) + (b ? b[r] : 0.0f);
      for (int64_t j = i; j < k; j++) s = std::fma(w.at(r, j), X[m * k + j], s);  // fused alike everywhere
      Y[m * ldy + r] = s;
    }
}

// A decoded tile: rows of ld floats.
struct TileRows {
  static constexpr bool PAIRS = false, WIDE = false;
  const float* T;
  int64_t ld;
  vf vec(int r, int64_t i) const { return vload(T + r * ld + i); }
  float at(int r, int64_t j) const { return T[r * ld + j]; }
  TileRows from(int64_t r) const { return {T + r * ld, ld}; }
};

template <int M, class Weights>
[[gnu::noinline]] static void dot_rows(const Weights& w, int64_t n, const float* X, int64_t k, const float* b,
                                       float* Y, int64_t ldy) {
  int64_t r = 0;
  if constexpr (Weights::WIDE && STREAM_ONE_WEIGHT_ROW) {
    constexpr int R = Weights::ROWS_TOGETHER;
    if constexpr (R > 1)
      for (; r + R <= n; r += R) dot_block<R, M>(w.from(r), X, k, b ? b + r : nullptr, Y + r, ldy);
  } else {
    if constexpr (M <= 4)
      for (; r + 4 <= n; r += 4) dot_block<4, M>(w.from(r), X, k, b ? b + r : nullptr, Y + r, ldy);
    for (; r + 2 <= n; r += 2) dot_block<2, M>(w.from(r), X, k, b ? b + r : nullptr, Y + r, ldy);
  }
  for (; r < n; r++) dot_block<1, M>(w.from(r), X, k, b ? b + r : nullptr, Y + r, ldy);
}

// Every input row of X [m, k] against n weight rows; Y points at their first output column. Weights decoded in
// registers (`Weights::WIDE`) take input rows 8 (or a last 5-7) at a time: each weight vector is then decoded once
// per 8 rows instead of twice. With 32 vector registers 2 x 8 accumulators fit (an LM head of 49152 x 576 at 8
// rows: int8 0.86x, int4 0.85x, NVFP4 0.92x the time, interleaved one-off timing on an AVX512 EPYC; bf16's
// shift-only decode lost 5%); with 16 (AVX2) a block holds one weight row (`STREAM_ONE_WEIGHT_ROW`).
template <class Weights>
static void dot_all(const Weights& w, int64_t n, const float* X, int64_t m, int64_t k, const float* b, float* Y,
                    int64_t ldy) {
  auto pass = [&]<int M>(int64_t i) { dot_rows<M>(w, n, X + i * k, k, b, Y + i * ldy, ldy); };
  if constexpr (Weights::WIDE && STREAM_ONE_WEIGHT_ROW) {
    for_row_blocks<STREAM_ROWS>(m, pass);
  } else {
    int64_t i = 0;
    if constexpr (Weights::WIDE) {
      for (; i + 8 <= m; i += 8) pass.template operator()<8>(i);
      switch (m - i) {  // 5-7 rows left (a speculative verify's): one pass too, not 4 rows and then the rest
        case 5: return pass.template operator()<5>(i);
        case 6: return pass.template operator()<6>(i);
        case 7: return pass.template operator()<7>(i);
      }
    }
    for_row_blocks(m - i, [&]<int M>(int64_t j) { pass.template operator()<M>(i + j); });
  }
}

// ---- Packed rows decoded in registers (k a multiple of 16: no tail): one per format, rows from `row` of a shard ----
struct Nvfp4Rows {
  static constexpr bool PAIRS = NVFP4_PAIRS, WIDE = true;  // PAIRS: x comes in `nvfp4_pair_order`
  static constexpr int ROWS_TOGETHER = 1;
  const uint8_t* q;
  const float* steps;  // each row's block steps, precomputed
  int64_t nb;
  vf vec(int r, int64_t i) const { return nvfp4_vec(q + r * nb * 8, i, steps[r * nb + i / 16]); }
  void vec2(int r, int64_t i, vf& even, vf& odd) const {
    const float* st = steps + r * nb + i / 16;
    nvfp4_pair_vec(q + r * nb * 8, i, st[0], st[1], even, odd);
  }
  float at(int, int64_t) const { return 0.0f; }
  Nvfp4Rows from(int64_t r) const { return {q + r * nb * 8, steps + r * nb, nb}; }
};

struct Int4Rows {  // rows start even: row r is the low (r even) or high nibble of byte row r / 2
  static constexpr bool PAIRS = false, WIDE = true;
  static constexpr int ROWS_TOGETHER = 2;  // the two nibbles of each byte
  const uint8_t* q;
  const float* scales;  // [rows, groups]
  int64_t k, groups, group_shift;
  vf vec(int r, int64_t i) const {
    return int4_vec(q + (r / 2) * k, i, scales[r * groups + (i >> group_shift)], r & 1);
  }
  float at(int, int64_t) const { return 0.0f; }
  Int4Rows from(int64_t r) const { return {q + r / 2 * k, scales + r * groups, k, groups, group_shift}; }
};

struct Int8Rows {
  static constexpr bool PAIRS = false, WIDE = true;
  static constexpr int ROWS_TOGETHER = 1;
  const int8_t* q;
  const float* scales;
  int64_t k;
  vf vec(int r, int64_t i) const { return int8_vec(q + r * k, i, scales[r]); }
  float at(int, int64_t) const { return 0.0f; }
  Int8Rows from(int64_t r) const { return {q + r * k, scales + r, k}; }
};

struct Fp8Rows {
  static constexpr bool PAIRS = false, WIDE = true;
  static constexpr int ROWS_TOGETHER = 1;
  const uint8_t* q;
  float scale;
  int64_t k;
  vf vec(int r, int64_t i) const { return fp8_vec(q + r * k, i, scale); }
  float at(int, int64_t) const { return 0.0f; }
  Fp8Rows from(int64_t r) const { return {q + r * k, scale, k}; }
};

struct Bf16Rows {
  static constexpr bool PAIRS = false, WIDE = false;
  const uint16_t* q;
  int64_t k;
  vf vec(int r, int64_t i) const { return bf16_vec(q + r * k, i); }
  float at(int, int64_t) const { return 0.0f; }
  Bf16Rows from(int64_t r) const { return {q + r * k, k}; }
};

// Weights decoded in registers for each pass of up to 4 input rows, or decoded once into a tile that every pass
// reads: both give the same bits. Decoding in registers costs less at any number of input rows (every pass after
// the first reads the tile's packed rows from L1), except FP8's decode, which costs more than the tile's loads
// from 5 rows on.
constexpr int64_t FP8_DIRECT_MAX_ROWS = 4;

static bool direct_applies(Format fmt, int64_t m, int64_t k, int64_t group) {
  bool group_pow2 = fmt != INT4 || (group & (group - 1)) == 0;
  return (fmt != FP8 || m <= FP8_DIRECT_MAX_ROWS) && k % 16 == 0 && group_pow2;  // whole NVFP4 blocks, whole vectors
}

// Rows [r0, r0 + n) of `s` against every input row, decoded in registers (`direct_applies`); `steps` is room for
// NVFP4's n * nb block steps.
static void dot_direct(Format fmt, const Shard& s, int64_t r0, int64_t n, const float* X, int64_t m, int64_t k,
                       int64_t group, float* steps, const float* b, float* Y, int64_t ldy) {
  const float* fscale = reinterpret_cast<const float*>(s.scales);
  if (fmt == NVFP4) {
    int64_t nb = k / 16;
    for (int64_t r = 0; r < n; r++) decode_fp8_row(s.scales + (r0 + r) * nb, s.tensor_scale, nb, steps + r * nb);
    dot_all(Nvfp4Rows{s.codes + r0 * nb * 8, steps, nb}, n, X, m, k, b, Y, ldy);
  } else if (fmt == INT4) {
    int64_t groups = (k + group - 1) / group;
    dot_all(Int4Rows{s.codes + r0 / 2 * k, fscale + r0 * groups, k, groups, __builtin_ctzll(group)}, n, X, m, k, b,
            Y, ldy);
  } else if (fmt == INT8) {
    dot_all(Int8Rows{reinterpret_cast<const int8_t*>(s.codes) + r0 * k, fscale + r0, k}, n, X, m, k, b, Y, ldy);
  } else if (fmt == FP8) {
    dot_all(Fp8Rows{s.codes + r0 * k, s.tensor_scale, k}, n, X, m, k, b, Y, ldy);
  } else {
    dot_all(Bf16Rows{reinterpret_cast<const uint16_t*>(s.codes) + r0 * k, k}, n, X, m, k, b, Y, ldy);
  }
}

static std::vector<Tile> make_tiles(const std::vector<Shard>& shards, int64_t tile_rows) {
  std::vector<Tile> tiles;
  for (int64_t s = 0; s < (int64_t)shards.size(); s++)
    for (int64_t r = 0; r < shards[s].rows; r += tile_rows)
      tiles.push_back({s, r, std::min(tile_rows, shards[s].rows - r)});
  return tiles;
}

static Shard check_shard(Format fmt, const at::Tensor& codes, const at::Tensor& scales, double tensor_scale,
                         int64_t k, int64_t group, int64_t col0) {
  TORCH_CHECK(codes.device().is_cpu() && codes.scalar_type() == at::kByte && codes.is_contiguous() &&
              codes.dim() == 2, "packed_linear: codes must be contiguous uint8 [rows, bytes] on the CPU");
  TORCH_CHECK(scales.device().is_cpu() && scales.is_contiguous(), "packed_linear: contiguous CPU scales");
  int64_t rows = fmt == INT4 ? 2 * codes.size(0) : codes.size(0);
  int64_t row_bytes = fmt == NVFP4 ? (k + 15) / 16 * 8 : fmt == BF16 ? 2 * k : k;
  TORCH_CHECK(codes.size(1) == row_bytes, "packed_linear: codes have ", codes.size(1), " bytes a row, want ",
              row_bytes);
  int64_t want_scales = fmt == NVFP4 ? rows * ((k + 15) / 16) : fmt == INT4 ? rows * ((k + group - 1) / group)
                        : fmt == INT8 ? rows : 0;
  TORCH_CHECK(fmt == FP8 || fmt == BF16 || scales.numel() == want_scales, "packed_linear: ", scales.numel(), " scales, want ",
              want_scales);
  TORCH_CHECK(fmt == NVFP4 || fmt == FP8 || fmt == BF16 || scales.scalar_type() == at::kFloat, "packed_linear: fp32 scales");
  TORCH_CHECK(fmt != NVFP4 || scales.scalar_type() == at::kByte, "packed_linear: E4M3 scales as uint8 bits");
  return {codes.data_ptr<uint8_t>(), static_cast<const uint8_t*>(scales.data_ptr()), (float)tensor_scale, rows, col0};
}

// x [..., k] fp32 (quantized first as `act_format` activations, unless -1) @ the shards' weights [rows_i, k]
// stacked, + bias [sum rows_i] -> [..., sum rows_i].
at::Tensor packed_linear(int64_t format, const at::Tensor& x_in, const std::vector<at::Tensor>& codes,
                         const std::vector<at::Tensor>& scales, const std::vector<double>& tensor_scales,
                         const std::optional<at::Tensor>& bias, int64_t group, int64_t act_format, double act_scale,
                         const std::optional<at::Tensor>& pre_scale, const std::vector<at::Tensor>& gemm) {
  Format fmt = static_cast<Format>(format);
  TORCH_CHECK(format >= NVFP4 && format <= BF16, "packed_linear: unknown format ", format);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat, "packed_linear: fp32 CPU input");
  TORCH_CHECK(act_format < 0 || act_format == format || (fmt == INT4 && act_format == ACT_INT8_GROUPS),
              "packed_linear: activations quantize in the weights' format (or INT4's as int8 groups)");
  TORCH_CHECK(codes.size() == scales.size() && codes.size() == tensor_scales.size() && !codes.empty(),
              "packed_linear: one codes, scales and tensor scale per shard");
  TORCH_CHECK(fmt != INT4 || (group > 0 && group % 16 == 0), "packed_linear: INT4 group must be a multiple of 16");
  int64_t k = x_in.size(-1), out = 0;
  std::vector<Shard> shards;
  for (size_t i = 0; i < codes.size(); i++) {
    shards.push_back(check_shard(fmt, codes[i], scales[i], tensor_scales[i], k, group, out));
    out += shards.back().rows;
  }
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == out), "packed_linear: contiguous fp32 bias of ", out);
  TORCH_CHECK(!pre_scale || (pre_scale->device().is_cpu() && pre_scale->scalar_type() == at::kFloat &&
                              pre_scale->numel() == k), "packed_linear: fp32 CPU pre_scale of ", k);
  // INT8's integer path multiplies by pre_scale while quantizing the input: the same products, one pass less.
  if (act_format == INT8 && int8_integer_path())
    return int8_integer_linear(x_in, act_scale, codes, scales, bias, pre_scale, gemm);
  const at::Tensor x_scaled = pre_scale ? x_in * *pre_scale : x_in;
  if (act_format == ACT_INT8_GROUPS) {
    TORCH_CHECK(group == 128, "packed_linear: INT4 W4A8 takes 128-groups");
    return int4_w4a8_linear(x_scaled, codes, scales, bias);
  }
  at::Tensor x2 = (act_format < 0 ? x_scaled : fake_quant_activations(act_format, x_scaled, act_scale)).contiguous();
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x_in.options());
  int64_t m = k ? x2.numel() / k : 0, ld = (k + 15) / 16 * 16;
  int64_t tile_rows = std::clamp<int64_t>(TILE_BYTES / (4 * std::max<int64_t>(ld, 1)) / 4 * 4, 4, 16);
  std::vector<Tile> tiles = make_tiles(shards, tile_rows);
  if (m == 0) return y;
  if (fmt == NVFP4 && NVFP4_PAIRS) {  // the order the NVFP4 weights are decoded in
    at::Tensor ordered = at::empty_like(x2);
    for (int64_t i = 0; i < m; i++) nvfp4_pair_order(x2.data_ptr<float>() + i * k, k, ordered.data_ptr<float>() + i * k);
    x2 = ordered;
  }
  const float* X = x2.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  bool direct = direct_applies(fmt, m, k, group);
  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t begin, int64_t end) {
    std::unique_ptr<float[]> buf(new float[tile_rows * ld]);  // uninitialized: every use writes first
    for (int64_t t = begin; t < end; t++) {
      const Tile& tile = tiles[t];
      const Shard& s = shards[tile.shard];
      int64_t col = s.col0 + tile.row0;
      if (direct) {
        dot_direct(fmt, s, tile.row0, tile.rows, X, m, k, group, buf.get(), b ? b + col : nullptr, Y + col, out);
      } else {
        decode_rows(fmt, s, tile.row0, tile.rows, k, group, buf.get(), ld);
        dot_all(TileRows{buf.get(), ld}, tile.rows, X, m, k, b ? b + col : nullptr, Y + col, out);
      }
    }
  });
  return y;
}
