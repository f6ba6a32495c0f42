"""A Llama-family decoder (Llama, Qwen2, Mistral) in plain PyTorch, built for serving.

Layout choices, each for speed on a small model where op dispatch costs as much as the GEMVs:
- q/k/v are one fused `Linear` and gate/up another, so a layer runs 4 GEMMs instead of 7.
- q/k rows are stored with each head's dims interleaved (x0, x_{D/2}, x1, ...), so RoPE is one complex
  multiply. Attention scores are invariant to permuting q and k dims alike, so results equal the HF layout's.
- GQA without repeating K/V: the G query heads that share a KV head are folded into the query length.
- On CPU in fp32 the GEMMs, RMSNorm, RoPE, SiLU-mul and one-token attention run as the C++ kernels of `ops` (one op each
  instead of 3-7 ATen ops, and GEMVs at ~2x MKL's bandwidth); elsewhere the same calls fall back to PyTorch.
Every `Linear` is a module of its own so quantization can replace it.
"""

from __future__ import annotations

import copy
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import ops, packed_linear
from .config import ModelConfig
from .kv_cache import KVCache
from .tree_attention import TreeMask


class Linear(nn.Module):
    """y = x @ W.T + b; quantized formats replace this module.

    The parameter is `weight_t` [in, out], on CPU held as the transpose of a row-major [out, in] tensor: the fp32
    kernel `ops.linear` reads each output's weights as one contiguous row (faster than MKL at batch 1), and
    ATen's bf16 GEMV also reads that layout faster. Only fp32 without the kernel keeps [in, out]
    contiguous, which MKL reads faster than F.linear's layout. `weight` gives the usual [out, in] view.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight_t = nn.Parameter(torch.empty(out_features, in_features).t(), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # `load_state_dict(assign=True)` adopts the given tensor: lay it out for the kernel first.
        w = state_dict.get(prefix + "weight_t")
        if w is not None and not w.t().is_contiguous() and ops.wants_row_major(w):
            state_dict[prefix + "weight_t"] = w.t().contiguous().t()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight_t, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        qkv_out = (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        self.qkv = Linear(cfg.hidden_size, qkv_out, bias=cfg.qkv_bias)
        self.o = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size)
        self.window = cfg.sliding_window or 0

    def forward(
        self,
        x: torch.Tensor,
        freqs: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor,
        mask: torch.Tensor | TreeMask | None,
    ) -> torch.Tensor:
        """`freqs` [B, S, D/2, 2] (cos, sin); `mask` None for decode and verify steps over the cache (each row
        attends up to its own position, within the sliding window; see `runner.mask_unless_kernel`), or a draft
        tree's `TreeMask` (rows at their own cache slots, attending the prefix and their ancestors).
        Without a cache (training) the keys are this call's own tokens."""
        return self.o(self.attend(self.qkv(x), freqs, cache, positions, mask))

    def attend(
        self,
        qkv: torch.Tensor,
        freqs: torch.Tensor,
        cache: KVCache | None,
        positions: torch.Tensor,
        mask: torch.Tensor | TreeMask | None,
    ) -> torch.Tensor:
        """RoPE, the KV write and attention for the projected `qkv` [B, S, (H + 2KV) * D]: [B, S, H * D], before
        the output projection."""
        B, S, _ = qkv.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = qkv.view(B, S, H + 2 * KV, D)
        ops.rope_(qkv, freqs, H + KV)  # q and k, in place
        k, v = qkv[:, :, H : H + KV], qkv[:, :, H + KV :]
        tree = mask if isinstance(mask, TreeMask) else None
        if cache is None:
            keys, values = k.transpose(1, 2), v.transpose(1, 2)  # [B, KV, S, D]
        else:  # draft-tree rows share positions: they are written at their own slots
            cache.update(self.layer_idx, positions if tree is None else tree.slots, k, v)
            if tree is not None and tree.dense is None:
                return ops.decode_attention(qkv, *cache.pages(self.layer_idx), tree.slots, H, self.window, tree)
            if mask is None and ops.decode_attention_available(qkv.dtype, qkv.device):
                return ops.decode_attention(qkv, *cache.pages(self.layer_idx), positions, H, self.window)
            keys, values = cache.window(self.layer_idx)  # [B, KV, L, D], gathered from the blocks
            mask = tree.dense if tree is not None else mask
        # Fold the G query heads of each KV head into the query axis: [B, KV, G*S, D].
        q = qkv[:, :, :H].reshape(B, S, KV, H // KV, D).permute(0, 2, 3, 1, 4).reshape(B, KV, -1, D)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [B, KV, G*S, D]
        return out.view(B, KV, H // KV, S, D).permute(0, 3, 1, 2, 4).reshape(B, S, H * D)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = Linear(cfg.hidden_size, 2 * cfg.intermediate_size)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(ops.silu_mul(self.gate_up(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, freqs, cache, positions, mask):
        fused = self.fused_weights(x)
        if fused is not None:
            return self.fused_forward(x, fused, freqs, cache, positions, mask)
        x = x + self.attn(self.attn_norm(x), freqs, cache, positions, mask)
        return x + self.mlp(self.mlp_norm(x))

    def fused_weights(self, x: torch.Tensor) -> tuple | None:
        """The packed kernel's q/k/v, o, gate/up and down weights when all four are weight-only packed layers it
        computes (`QuantLinear.fused`) and `x` is what it takes; else None."""
        linears = (self.attn.qkv, self.attn.o, self.mlp.gate_up, self.mlp.down)
        fused = tuple(getattr(m, "fused", None) for m in linears)
        if None in fused or x.requires_grad or x.dtype != torch.float32 or not x.is_contiguous():
            return None
        return fused

    def fused_forward(self, x, fused: tuple, freqs, cache, positions, mask):
        """`forward` in three kernel calls around the attention (`csrc/packed_layer.cpp`), the same results bit for
        bit: on a small model at 4-bit weights the ops and modules between the matmuls cost as much as they do."""
        qkv_w, o_w, gate_up_w, down_w = fused
        kernel = packed_linear.load()
        qkv = kernel.norm_linear(x, self.attn_norm.weight, self.attn_norm.eps, qkv_w)
        x = kernel.linear_add(o_w, self.attn.attend(qkv, freqs, cache, positions, mask), x)
        return kernel.mlp_add(x, self.mlp_norm.weight, self.mlp_norm.eps, gate_up_w, down_w)


# Transformer -> {num_layers: ([(linear, its fused weight)], LayerStack)}: beside the module, so copying a model
# never copies a stack.
_LAYER_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Transformer(nn.Module):
    """The whole decoder. `forward` returns logits for the positions `logits_at` selects."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)  # tied: a transposed copy of `embed`
        self.freqs_cis = torch.empty(0, dtype=torch.complex64)
        self.rope_table = torch.empty(0, 0, 2)

    def set_rope(self, inv_freq: torch.Tensor, scaling: float, max_len: int) -> None:
        """Precompute e^(i * pos * inv_freq) * scaling for positions [0, max_len): [L, D/2] complex, and the same
        as (cos, sin) pairs, `rope_table` [L, D/2, 2], which the layers use."""
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq.float())
        self.freqs_cis = torch.polar(torch.full_like(angles, scaling), angles).to(self.embed.weight.device)
        self.rope_table = torch.view_as_real(self.freqs_cis)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | TreeMask | None,
        capture: tuple[int, ...] = (),
        num_layers: int | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the layers over `tokens` [B, S] at `positions` [B, S]; returns states [B, S, H] (before the final
        norm) and the outputs of the layers listed in `capture` (what an EAGLE-3 draft head reads).

        `mask` [B, 1, G*S, L] bool, None for a decode/verify step, or a draft tree's (see `Attention.forward`);
        `cache` None runs without a KV cache (training: the keys are the tokens given, `mask` must be causal);
        `num_layers` stops after that many layers (when only captured states are wanted)."""
        x = self.embed(tokens)
        freqs = self.rope_table[positions]  # [B, S, D/2, 2]
        tree = mask if isinstance(mask, TreeMask) and mask.dense is None else None  # one the kernel reads
        stack = self.layer_stack(x, cache, None if tree is not None else mask, num_layers)
        if stack is not None:  # every layer in one kernel call
            slots = positions if tree is None else tree.slots  # where rows are written (a tree's share positions)
            x, *captured = packed_linear.load().decoder_layers(
                stack, x, freqs, cache.k, cache.v, cache.token_rows(slots), cache.block_table, slots,
                *ops.tree_operands(tree), list(capture))
            return x, captured
        captured = []
        for i, layer in enumerate(self.layers[:num_layers]):
            x = layer(x, freqs, cache, positions, mask)
            if i in capture:
                captured.append(x)
        return x, captured

    def layer_stack(self, x: torch.Tensor, cache: KVCache | None, mask, num_layers: int | None):
        """The packed kernel's `LayerStack` of the first `num_layers` layers when `decoder_layers` computes this
        forward: every layer on the fused path (`DecoderLayer.fused_weights`), rows attending through the kernel
        (`mask` None: prefill, decode, chain verify, ragged rows, a draft tree the kernel reads), unquantized fp32 KV
        pools; else None. Built once per model and set of fused weights (served weights change by swapping models,
        or a linear's `fused`)."""
        if (cache is None or mask is not None or cache.kv_format != "none" or cache.k.dtype != torch.float32
                or x.requires_grad or x.dtype != torch.float32 or not x.is_contiguous()):
            return None
        stacks = _LAYER_STACKS.setdefault(self, {})
        held = stacks.get(num_layers)
        if held is not None and all(m.fused is f for m, f in held[0]):
            return held[1]
        layers = self.layers[:num_layers]
        fused = []
        for layer in layers:
            weights = layer.fused_weights(x)
            if weights is None:
                return None
            fused.append(weights)
        attn = layers[0].attn
        stack = packed_linear.load().LayerStack(
            [la.attn_norm.weight for la in layers], [la.mlp_norm.weight for la in layers],
            *([ws[i] for ws in fused] for i in range(4)), self.cfg.rms_norm_eps, attn.n_heads, attn.n_kv, attn.window)
        linears = [(m, m.fused) for la in layers for m in (la.attn.qkv, la.attn.o, la.mlp.gate_up, la.mlp.down)]
        stacks[num_layers] = (linears, stack)
        return stack

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head over states [..., H]; fp32 logits [..., V]."""
        return self.lm_head(self.norm(x)).float()

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Logits [B, S, V] if `all_logits` else [B, V] for each row's last position."""
        x, _ = self.hidden_states(tokens, positions, cache, mask)
        return self.logits(x if all_logits else x[:, -1])


def with_layers(model: Transformer, layers: dict[str, nn.Module]) -> Transformer:
    """A copy of `model` with the named submodules replaced; every other tensor is shared, not copied (modules are
    new objects, so hooks or replacements on the copy never reach `model`)."""
    shared = {id(t): t for t in (*model.parameters(), *model.buffers())}
    new = copy.deepcopy(model, memo=shared)
    for name, layer in layers.items():
        parent, child = name.rsplit(".", 1)
        setattr(new.get_submodule(parent), child, layer)
    return new
