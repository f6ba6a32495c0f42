// What the packed-weight extension exports (packed_layer.cpp binds it): the matmul from packed shards and the fused
// steps of a decoder layer built on it.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

at::Tensor packed_linear(int64_t format, const at::Tensor& x, const std::vector<at::Tensor>& codes,
                         const std::vector<at::Tensor>& scales, const std::vector<double>& tensor_scales,
                         const std::optional<at::Tensor>& bias, int64_t group);

// One linear layer as the kernel computes it, gathered once: its shards, bias and the AWQ `pre_quant_scale` its
// input is multiplied by first. Only weight-only formats: activations reach the kernel as they are.
struct PackedWeight {
  int64_t format;
  std::vector<at::Tensor> codes, scales;
  std::vector<double> tensor_scales;
  std::optional<at::Tensor> bias, pre_scale;
  int64_t group;
};
