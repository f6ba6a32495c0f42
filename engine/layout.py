"""How Hugging Face Llama-family tensor names and rows map onto our `Transformer` — the one table that weight
loading (engine/weights.py), the ModelOpt checkpoint reader (engine/quantized_checkpoint.py), export
(optimize/export.py) and PTQ (optimize/ptq.py) all derive from, like nano-vllm's `packed_modules_mapping`.

Per decoder layer, our fused linears stack HF projections by rows (`LAYER_LINEARS`): qkv = [q; k; v] and
gate_up = [gate; up]. q/k rows differ in order: HF keeps each head's RoPE pairs half-split (d and d + D/2), ours
interleaves them (2d and 2d + 1) so RoPE rotates adjacent pairs (`rope_row_perm`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import ModelConfig

HF_LAYER = "model.layers.{i}."
# Unfused tensors: our name -> HF's (per layer: relative to the layer prefix of each side).
MODEL_TENSORS = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
LAYER_NORMS = {"attn_norm.weight": "input_layernorm.weight", "mlp_norm.weight": "post_attention_layernorm.weight"}


@dataclass(frozen=True)
class Projection:
    """One HF projection: its name, its output rows and (q/k) the heads whose rows RoPE orders differently."""

    name: str  # HF's, e.g. "q_proj"
    rows: Callable[[ModelConfig], int]
    rope_heads: Callable[[ModelConfig], int] | None = None

    def row_perm(self, cfg: ModelConfig, to_hf: bool = False) -> torch.Tensor | None:
        """Index vector taking HF's rows to ours (or back, `to_hf`); None where the orders agree."""
        return None if self.rope_heads is None else rope_row_perm(self.rope_heads(cfg), cfg.head_dim, to_hf)


@dataclass(frozen=True)
class LayerLinear:
    """One linear of a decoder layer: our (possibly fused) module and the HF projections stacked in it."""

    ours: str  # path inside a `DecoderLayer`, e.g. "attn.qkv"
    hf_module: str  # HF's parent module inside a layer, e.g. "self_attn"
    projections: tuple[Projection, ...]  # in row order
    in_features: Callable[[ModelConfig], int]

    def module_name(self, i: int) -> str:
        """Our module's name in the `Transformer`, e.g. "layers.3.attn.qkv"."""
        return f"layers.{i}.{self.ours}"

    def hf_prefix(self, i: int) -> str:
        """HF's prefix of this linear's projections in layer i, e.g. "model.layers.3.self_attn."."""
        return f"{HF_LAYER.format(i=i)}{self.hf_module}."

    def rows(self, cfg: ModelConfig) -> list[int]:
        """Row counts of the stacked projections: how our fused weight splits back into HF's."""
        return [p.rows(cfg) for p in self.projections]


def _heads_rows(cfg: ModelConfig) -> int:
    return cfg.num_heads * cfg.head_dim


def _kv_rows(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads * cfg.head_dim


def _heads(cfg: ModelConfig) -> int:
    return cfg.num_heads


def _kv_heads(cfg: ModelConfig) -> int:
    return cfg.num_kv_heads


def _hidden(cfg: ModelConfig) -> int:
    return cfg.hidden_size


def _intermediate(cfg: ModelConfig) -> int:
    return cfg.intermediate_size


LAYER_LINEARS = (
    LayerLinear("attn.qkv", "self_attn", (Projection("q_proj", _heads_rows, _heads),
                                          Projection("k_proj", _kv_rows, _kv_heads),
                                          Projection("v_proj", _kv_rows)), _hidden),
    LayerLinear("attn.o", "self_attn", (Projection("o_proj", _hidden),), _heads_rows),
    LayerLinear("mlp.gate_up", "mlp", (Projection("gate_proj", _intermediate), Projection("up_proj", _intermediate)),
                _hidden),
    LayerLinear("mlp.down", "mlp", (Projection("down_proj", _hidden),), _intermediate),
)


def layer_linear(module_name: str) -> LayerLinear:
    """The table entry of one of our linears, by its name in the `Transformer` ("layers.3.attn.qkv")."""
    for linear in LAYER_LINEARS:
        if module_name.endswith("." + linear.ours):
            return linear
    raise KeyError(f"{module_name!r} is not a decoder-layer linear")


def rope_row_perm(n_heads: int, head_dim: int, to_hf: bool = False) -> torch.Tensor:
    """Row order taking HF's half-split q/k rows to our interleaved pairs (or back, `to_hf`), as an index vector."""
    half = torch.arange(head_dim // 2)
    per_head = torch.stack([half, half + head_dim // 2], dim=1).flatten()  # [0, D/2, 1, D/2+1, ...]
    if to_hf:
        per_head = torch.argsort(per_head)
    return (torch.arange(n_heads)[:, None] * head_dim + per_head[None, :]).flatten()
