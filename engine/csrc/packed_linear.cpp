// y = x @ W.T (+ b) in fp32 for a weight held packed (NVFP4, INT4, INT8, FP8) or in bf16, as one shard or several written side
// by side (fused q/k/v, gate/up). A few weight rows at a time are decoded (packed_decode.h) into a per-thread tile
// that stays in L1/L2, and every input row takes its dot products from that tile: the weight is read packed once
// per call and no fp32 copy of it is ever held.
// Every output is one dot product accumulated alone, in a fixed order (vector lanes along k, their sum, the bias,
// then the tail), whatever the number of input rows and however the tiles fall, so an n-row call (speculative
// verify) gives each row bit for bit what a 1-row call (decode) gives.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

#include "packed_decode.h"
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
      decode_nvfp4_row(s.codes + (r0 + r) * nb * 8, s.scales + (r0 + r) * nb, s.tensor_scale, nb, dst + r * ld);
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

// Y[m * ldy + r] = dot(X[m, :k], T[r, :k]) + b[r] for R tile rows and M input rows: R * M accumulators.
template <int R, int M>
static inline void dot_block(const float* T, int64_t ld, const float* X, int64_t k, const float* b, float* Y,
                             int64_t ldy) {
  vf acc[R][M];
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) acc[r][m] = vzero();
  int64_t i = 0;
  for (; i + V <= k; i += V) {
    vf xv[M];
    for (int m = 0; m < M; m++) xv[m] = vload(X + m * k + i);
    for (int r = 0; r < R; r++) {
      vf w = vload(T + r * ld + i);
      for (int m = 0; m < M; m++) acc[r][m] = vfma(w, xv[m], acc[r][m]);
    }
  }
  for (int r = 0; r < R; r++)
    for (int m = 0; m < M; m++) {
      float s = hsum(acc[r][m]) + (b ? b[r] : 0.0f);
      for (int64_t j = i; j < k; j++) s += T[r * ld + j] * X[m * k + j];
      Y[m * ldy + r] = s;
    }
}

template <int M>
static void dot_tile_rows(const float* T, int64_t ld, int64_t n, const float* X, int64_t k, const float* b, float* Y,
                          int64_t ldy) {
  int64_t r = 0;
  for (; r + 4 <= n; r += 4) dot_block<4, M>(T + r * ld, ld, X, k, b ? b + r : nullptr, Y + r, ldy);
  for (; r < n; r++) dot_block<1, M>(T + r * ld, ld, X, k, b ? b + r : nullptr, Y + r, ldy);
}

// Every input row of X [m, k] against the n decoded rows of T; Y points at the tile's first output column.
static void dot_tile(const float* T, int64_t ld, int64_t n, const float* X, int64_t m, int64_t k, const float* b,
                     float* Y, int64_t ldy) {
  for (int64_t i = 0; i < m; i += 4) {
    const float* Xi = X + i * k;
    float* Yi = Y + i * ldy;
    switch (std::min<int64_t>(4, m - i)) {
      case 1: dot_tile_rows<1>(T, ld, n, Xi, k, b, Yi, ldy); break;
      case 2: dot_tile_rows<2>(T, ld, n, Xi, k, b, Yi, ldy); break;
      case 3: dot_tile_rows<3>(T, ld, n, Xi, k, b, Yi, ldy); break;
      default: dot_tile_rows<4>(T, ld, n, Xi, k, b, Yi, ldy); break;
    }
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

// x [..., k] fp32 @ the shards' weights [rows_i, k] stacked, + bias [sum rows_i] -> [..., sum rows_i].
at::Tensor packed_linear(int64_t format, const at::Tensor& x, const std::vector<at::Tensor>& codes,
                         const std::vector<at::Tensor>& scales, const std::vector<double>& tensor_scales,
                         const std::optional<at::Tensor>& bias, int64_t group) {
  Format fmt = static_cast<Format>(format);
  TORCH_CHECK(format >= NVFP4 && format <= BF16, "packed_linear: unknown format ", format);
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat, "packed_linear: fp32 CPU input");
  TORCH_CHECK(codes.size() == scales.size() && codes.size() == tensor_scales.size() && !codes.empty(),
              "packed_linear: one codes, scales and tensor scale per shard");
  TORCH_CHECK(fmt != INT4 || (group > 0 && group % 16 == 0), "packed_linear: INT4 group must be a multiple of 16");
  int64_t k = x.size(-1), out = 0;
  std::vector<Shard> shards;
  for (size_t i = 0; i < codes.size(); i++) {
    shards.push_back(check_shard(fmt, codes[i], scales[i], tensor_scales[i], k, group, out));
    out += shards.back().rows;
  }
  TORCH_CHECK(!bias || (bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->is_contiguous() &&
                        bias->numel() == out), "packed_linear: contiguous fp32 bias of ", out);
  at::Tensor x2 = x.contiguous();
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out;
  at::Tensor y = at::empty(shape, x.options());
  int64_t m = k ? x2.numel() / k : 0, ld = (k + 15) / 16 * 16;
  int64_t tile_rows = std::clamp<int64_t>(TILE_BYTES / (4 * std::max<int64_t>(ld, 1)) / 4 * 4, 4, 16);
  std::vector<Tile> tiles = make_tiles(shards, tile_rows);
  const float* X = x2.data_ptr<float>();
  const float* b = bias ? bias->data_ptr<float>() : nullptr;
  float* Y = y.data_ptr<float>();
  if (m == 0) return y;
  at::parallel_for(0, (int64_t)tiles.size(), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> buf(tile_rows * ld);
    for (int64_t t = begin; t < end; t++) {
      const Tile& tile = tiles[t];
      const Shard& s = shards[tile.shard];
      int64_t col = s.col0 + tile.row0;
      decode_rows(fmt, s, tile.row0, tile.rows, k, group, buf.data(), ld);
      dot_tile(buf.data(), ld, tile.rows, X, m, k, b ? b + col : nullptr, Y + col, out);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("packed_linear", &packed_linear,
          "x @ W.T (+ bias) straight from packed NVFP4 / INT4 / INT8 / FP8 / BF16 shards (format 0..4)");
}
