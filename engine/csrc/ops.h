// The ops the extension exports (bindings.cpp); each .cpp defines its own. Inputs are checked, not converted:
// ops.py decides when a kernel applies and otherwise runs the PyTorch reference.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

at::Tensor linear(const at::Tensor& x, const at::Tensor& weight_t, const std::optional<at::Tensor>& bias);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps);
at::Tensor silu_mul(const at::Tensor& gu);
void rope_(at::Tensor& x, const at::Tensor& freqs, int64_t nheads);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& block_table, const at::Tensor& pos, int64_t H, int64_t window,
                            const at::Tensor& tree_base, const at::Tensor& tree_mask);
at::Tensor decode_attention_packed(const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scales,
                                   const at::Tensor& v_codes, const at::Tensor& v_scales, int64_t format,
                                   double k_scale, double v_scale, const at::Tensor& block_table, const at::Tensor& pos,
                                   int64_t H, int64_t window, const at::Tensor& tree_base, const at::Tensor& tree_mask);
void kv_write(int64_t format, const at::Tensor& x, const at::Tensor& rows, at::Tensor& codes, at::Tensor& scales,
              double scale, const at::Tensor& mean, const at::Tensor& rot, const std::vector<double>& factors);
void kv_store(const at::Tensor& k, const at::Tensor& v, const at::Tensor& rows, at::Tensor& k_pool,
              at::Tensor& v_pool);

static inline bool is_f32_cpu(const at::Tensor& t) { return t.device().is_cpu() && t.scalar_type() == at::kFloat; }
