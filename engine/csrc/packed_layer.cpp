// The steps of a batch-1..n decoder layer over packed linears, one call each from Python instead of 3-5 ops and
// modules (at 4-bit weights the dispatch between ops is a large part of a decode step); a format that quantizes
// activations quantizes each linear's input first, as its module does:
//   norm_linear: linear(rms_norm(x))                  (q/k/v; RoPE and the KV write stay in Python)
//   linear_add:  residual + linear(x)                 (the attention output projection)
//   mlp_add:     x + down(silu(gate) * up)(rms_norm(x))
// and `decoder_layers`, every layer of a forward in one call (with RoPE, the KV store and the attention kernel).
// `draft_head_step` is an EAGLE-3 draft head's forward in one call, the same way.
// Each is the composition of the same kernels the modules call (rms_norm and silu_mul from rowwise.cpp, the packed
// matmul) and the same fp32 elementwise products and sums, so it gives the module path's results bit for bit.
#include <torch/extension.h>

#include <algorithm>

#include "ops.h"
#include "packed_ops.h"

// x [..., K] (times the pre-quant scale, then quantized as the format's activations) @ W.T + b.
static at::Tensor apply(const PackedWeight& w, const at::Tensor& x) {
  return packed_linear(w.format, x, w.codes, w.scales, w.tensor_scales, w.bias, w.group, w.act_format, w.act_scale,
                       w.pre_scale, w.gemm);
}

at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& norm, double eps, const PackedWeight& w) {
  return apply(w, rms_norm(x, norm, eps));
}

at::Tensor linear_add(const PackedWeight& w, const at::Tensor& x, const at::Tensor& residual) {
  return residual + apply(w, x);
}

at::Tensor mlp_add(const at::Tensor& x, const at::Tensor& norm, double eps, const PackedWeight& gate_up,
                   const PackedWeight& down) {
  return x + apply(down, silu_mul(apply(gate_up, rms_norm(x, norm, eps))));
}

// A model's layers as `decoder_layers` takes them, gathered once per set of weights.
struct LayerStack {
  std::vector<at::Tensor> attn_norm, mlp_norm;
  std::vector<PackedWeight> qkv, o, gate_up, down;
  double eps;
  int64_t n_heads, n_kv, window;
};

// Every layer of a forward whose rows all attend through the attention kernel (prefill, decode, chain verify,
// ragged rows, a draft tree the kernel takes) over unquantized fp32 KV pools: per layer what
// `DecoderLayer.fused_forward` and `Attention.attend` do, the same kernels in the same order (so the same bits),
// without the 30 x 6 calls from Python that cost as much as small matmuls at 4-bit weights. x [B, S, hidden];
// freqs [B, S, D/2, 2] (RoPE at the rows' positions); k/v_pools [layers, N, bs, KV, D]; rows [B * S] the pools'
// token rows of `slots` [B, S], the cache indices the rows are written at and attend up to (their positions, but
// for a tree's); block_table [B, nb]; tree_base [B] and tree_ancestors [B, S, T] a draft tree's (tree_attention.py),
// or empty. Returns x after the layers, then the outputs of the layers listed in `capture` (the EAGLE head's
// features).
std::vector<at::Tensor> decoder_layers(const LayerStack& st, at::Tensor x, const at::Tensor& freqs,
                                       const at::Tensor& k_pools, const at::Tensor& v_pools, const at::Tensor& rows,
                                       const at::Tensor& block_table, const at::Tensor& slots,
                                       const at::Tensor& tree_base, const at::Tensor& tree_ancestors,
                                       const std::vector<int64_t>& capture) {
  const int64_t B = x.size(0), S = x.size(1), H = st.n_heads, KV = st.n_kv, D = k_pools.size(-1);
  std::vector<at::Tensor> out{x};
  for (size_t l = 0; l < st.qkv.size(); l++) {
    at::Tensor qkv = apply(st.qkv[l], rms_norm(x, st.attn_norm[l], st.eps)).view({B, S, H + 2 * KV, D});
    rope_(qkv, freqs, H + KV);  // q and k, in place
    at::Tensor k_pool = k_pools.select(0, l), v_pool = v_pools.select(0, l);
    kv_store(qkv.narrow(2, H, KV), qkv.narrow(2, H + KV, KV), rows, k_pool, v_pool);
    at::Tensor attn = decode_attention(qkv, k_pool, v_pool, block_table, slots, H, st.window, tree_base,
                                       tree_ancestors);
    x = mlp_add(linear_add(st.o[l], attn, x), st.mlp_norm[l], st.eps, st.gate_up[l], st.down[l]);
    if (std::find(capture.begin(), capture.end(), static_cast<int64_t>(l)) != capture.end()) out.push_back(x);
  }
  out[0] = x;
  return out;
}

// An EAGLE-3 draft head's layer (engine/spec/draft_head.py), gathered once per head: the target's embedding table,
// its norms, its five linears (as bf16 or packed weights) and attention shape.
struct HeadStack {
  at::Tensor embed, embed_norm, hidden_norm, mlp_norm, norm;
  PackedWeight qkv, o, gate_up, down, lm_head;
  double eps;
  int64_t n_heads, n_kv, window;
};

// One forward of the head over `tokens` [B, S] (target ids) and `hidden` [B, S, H], as `DraftHead.forward` and
// `DraftHead.logits` compute it with the same kernels in the same order (so the same bits), in one call: a draft
// step is a few small matmuls, and the ~20 ops and modules between them cost as much as a fifth of it. The cache
// operands are `decoder_layers`' for the head's one-layer pools. Returns the output states [B, S, H], then, with
// `logits`, the draft-vocabulary logits [B, S, Vd].
std::vector<at::Tensor> draft_head_step(const HeadStack& st, const at::Tensor& tokens, const at::Tensor& hidden,
                                        const at::Tensor& freqs, const at::Tensor& k_pools,
                                        const at::Tensor& v_pools, const at::Tensor& rows,
                                        const at::Tensor& block_table, const at::Tensor& slots,
                                        const at::Tensor& tree_base, const at::Tensor& tree_ancestors, bool logits) {
  const int64_t B = tokens.size(0), S = tokens.size(1), H = st.n_heads, KV = st.n_kv, D = k_pools.size(-1);
  at::Tensor e = st.embed.index_select(0, tokens.reshape(-1)).view({B, S, -1});  // [B, S, hidden]
  at::Tensor x = at::cat({rms_norm(e, st.embed_norm, st.eps), rms_norm(hidden, st.hidden_norm, st.eps)}, -1);
  at::Tensor qkv = apply(st.qkv, x).view({B, S, H + 2 * KV, D});
  rope_(qkv, freqs, H + KV);  // q and k, in place
  at::Tensor k_pool = k_pools.select(0, 0), v_pool = v_pools.select(0, 0);
  kv_store(qkv.narrow(2, H, KV), qkv.narrow(2, H + KV, KV), rows, k_pool, v_pool);
  at::Tensor attn = decode_attention(qkv, k_pool, v_pool, block_table, slots, H, st.window, tree_base,
                                     tree_ancestors);
  at::Tensor h = mlp_add(linear_add(st.o, attn, hidden), st.mlp_norm, st.eps, st.gate_up, st.down);
  if (!logits) return {h};
  return {h, apply(st.lm_head, rms_norm(h, st.norm, st.eps))};
}

// The kernels run without the GIL (see bindings.cpp).
PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  mod.def("packed_linear", &packed_linear, no_gil,
          "x @ W.T (+ bias) straight from packed NVFP4 / INT4 / INT8 / FP8 / BF16 shards (format 0..4)");
  using Tensors = std::vector<at::Tensor>;
  using MaybeTensor = std::optional<at::Tensor>;
  // Module-local: a build for another CPU (the AVX2 test) loads beside this one. Pickled as its fields, so
  // `copy.deepcopy` of a model (`model.with_layers`) shares or copies its tensors as it does the layer's own; the
  // GEMM copy is packed again from the copied codes (oneDNN's blocked tensors have no storage to pickle).
  py::class_<PackedWeight>(mod, "PackedWeight", py::module_local())
      .def(py::init<int64_t, Tensors, Tensors, std::vector<double>, MaybeTensor, MaybeTensor, int64_t, int64_t,
                    double, Tensors>())
      .def(py::pickle(
          [](const PackedWeight& w) {
            return py::make_tuple(w.format, w.codes, w.scales, w.tensor_scales, w.bias, w.pre_scale, w.group,
                                  w.act_format, w.act_scale, !w.gemm.empty());
          },
          [](const py::tuple& t) {
            const auto codes = t[1].cast<Tensors>(), scales = t[2].cast<Tensors>();
            return PackedWeight{t[0].cast<int64_t>(), codes, scales, t[3].cast<std::vector<double>>(),
                                t[4].cast<MaybeTensor>(), t[5].cast<MaybeTensor>(), t[6].cast<int64_t>(),
                                t[7].cast<int64_t>(), t[8].cast<double>(),
                                t[9].cast<bool>() ? int8_gemm_pack(codes, scales) : Tensors{}};
          }));
  mod.def("fake_quant_activations", &fake_quant_activations, no_gil,
          "x quantized-dequantized as NVFP4 / INT8 / FP8 activations (format 0 / 2 / 3) with a per-tensor scale, or "
          "as W4A8's int8 per 128-group (5)");
  mod.def("int8_gemm_pack", &int8_gemm_pack, "INT8 shards' codes and scales as oneDNN's GEMM takes them, packed "
          "once (empty where this build does not use it)");
  mod.def("int8_integer_path", &int8_integer_path, "whether INT8 W8A8 runs as integer sums (AVX512-VNNI or AVX2) here");
  mod.def("norm_linear", &norm_linear, no_gil, "linear(rms_norm(x))");
  mod.def("linear_add", &linear_add, no_gil, "residual + linear(x)");
  mod.def("mlp_add", &mlp_add, no_gil, "x + down(silu(gate) * up) of rms_norm(x)");
  py::class_<LayerStack>(mod, "LayerStack", py::module_local())
      .def(py::init<Tensors, Tensors, std::vector<PackedWeight>, std::vector<PackedWeight>, std::vector<PackedWeight>,
                    std::vector<PackedWeight>, double, int64_t, int64_t, int64_t>());
  mod.def("decoder_layers", &decoder_layers, no_gil,
          "every decoder layer of a kernel-attended forward over fp32 KV pools");
  py::class_<HeadStack>(mod, "HeadStack", py::module_local())
      .def(py::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, PackedWeight, PackedWeight,
                    PackedWeight, PackedWeight, PackedWeight, double, int64_t, int64_t, int64_t>());
  mod.def("draft_head_step", &draft_head_step, no_gil,
          "an EAGLE-3 draft head's layer (and its logits) over its kernel-attended fp32 KV pool");
}
