"""Minitron-style structured pruning to a parameter budget; writes an ordinary (smaller) HF Llama checkpoint.

- depth: greedily drop the layer whose removal raises the KL to the full model least on calibration windows,
  until the model fits (each round re-measures with the layers already gone).
- width: rank channels by activation importance on calibration data (mean |input| that `calibrate` records):
  MLP channels by the down projection's input, query heads by their share of the o projection's input (within
  each GQA group, so every KV head keeps the same number of query heads), embedding channels by the summed
  RMSNorm outputs feeding every layer. The shape is the largest one within budget.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from optiserve.engine.config import ModelConfig
from optiserve.engine.model import Linear, Transformer

from .calibrate import CalibStats
from .train import causal_inputs

AXES = ("width", "depth")
HIDDEN_MULTIPLE = 16  # pruned sizes stay multiples of these (NVFP4 blocks of 16, GEMM-friendly)
MLP_MULTIPLE = 64


@dataclass
class PruneRequest:
    target_params: int
    axis: str = "depth"

    def __post_init__(self) -> None:
        if self.axis not in AXES:
            raise ValueError(f"unknown --axis {self.axis!r}; choose from {', '.join(AXES)}")
        if self.target_params < 1:
            raise ValueError("--target-params must be positive")


def count_params(cfg: ModelConfig) -> int:
    """Parameters of a Llama-family model with this config (embeddings counted; a tied LM head once)."""
    H, D = cfg.hidden_size, cfg.head_dim
    attn = H * (cfg.num_heads + 2 * cfg.num_kv_heads) * D + cfg.num_heads * D * H
    attn += (cfg.num_heads + 2 * cfg.num_kv_heads) * D if cfg.qkv_bias else 0
    layer = attn + 3 * H * cfg.intermediate_size + 2 * H
    head = 0 if cfg.tie_word_embeddings else cfg.vocab_size * H
    return cfg.vocab_size * H + head + H + cfg.num_layers * layer


def check_target(cfg: ModelConfig, req: PruneRequest) -> None:
    total = count_params(cfg)
    if req.target_params >= total:
        raise ValueError(f"--target-params {req.target_params:,} is not below the model's {total:,} parameters")
    if req.axis == "depth":
        floor = count_params(dataclasses.replace(cfg, num_layers=1))
    else:
        floor = min(count_params(c) for c in width_candidates(cfg))
    if req.target_params < floor:
        raise ValueError(f"--target-params {req.target_params:,} is below the smallest {req.axis}-pruned model "
                         f"({floor:,} parameters)")


def smaller(cfg: ModelConfig, layers: int, hidden: int, mlp: int, heads_per_group: int) -> ModelConfig:
    """`cfg` with fewer layers / channels / query heads (head_dim and KV heads unchanged)."""
    return dataclasses.replace(cfg, num_layers=layers, hidden_size=hidden, intermediate_size=mlp,
                               num_heads=heads_per_group * cfg.num_kv_heads)


def width_candidates(cfg: ModelConfig) -> list[ModelConfig]:
    """Every width-pruned shape: query heads per group G..1, hidden sizes in multiples of 16 that HF's LlamaConfig
    accepts (a multiple of the head count), MLP sizes in multiples of 64."""
    out = []
    for g in range(cfg.group_size, 0, -1):
        step = math.lcm(HIDDEN_MULTIPLE, g * cfg.num_kv_heads)
        for hidden in range(cfg.hidden_size // step * step, 0, -step):
            for mlp in range(cfg.intermediate_size // MLP_MULTIPLE * MLP_MULTIPLE, 0, -MLP_MULTIPLE):
                out.append(smaller(cfg, cfg.num_layers, hidden, mlp, g))
    return out


def pick_width(cfg: ModelConfig, target: int) -> ModelConfig:
    """The largest width-pruned shape within `target` parameters (ties: wider hidden, then more heads)."""
    fits = [c for c in width_candidates(cfg) if count_params(c) <= target]
    if not fits:
        raise ValueError(f"no width-pruned model fits {target:,} parameters")
    return max(fits, key=lambda c: (count_params(c), c.hidden_size, c.num_heads))


# ------------------------------------------------------------------------------------------------------ depth ---
@torch.inference_mode()
def _kl_without(model: Transformer, states: list[torch.Tensor], ref_logp: torch.Tensor, kept: list[int],
                drop: int, mask: torch.Tensor, freqs: torch.Tensor, positions: torch.Tensor) -> float:
    """KL(full || model without `kept[drop]`), re-running only the layers after the dropped one.
    `states[j]` [B, S, H] is the input of `kept[j]` with the current layer set."""
    x = states[drop]
    for i in kept[drop + 1 :]:
        x = model.layers[i](x, freqs, None, positions, mask)
    logp = F.log_softmax(model.logits(x), dim=-1)  # [B, S, V]
    return F.kl_div(logp.flatten(0, 1), ref_logp.flatten(0, 1), log_target=True, reduction="batchmean").item()


@torch.inference_mode()
def choose_layers(model: Transformer, windows: list[list[int]], n_layers: int) -> list[int]:
    """Greedy: drop, one at a time, the layer whose removal raises the KL to the full model least."""
    tokens = torch.tensor(windows)  # [B, S]
    positions, mask = causal_inputs(tokens, model)
    freqs = model.rope_table[positions]
    x, _ = model.hidden_states(tokens, positions, None, mask)
    ref_logp = F.log_softmax(model.logits(x), dim=-1)
    kept = list(range(model.cfg.num_layers))
    trials = sum(range(n_layers + 1, len(kept) + 1))  # one KL per candidate layer, per layer dropped
    with tqdm(total=trials, desc="choosing layers to drop", unit="trial") as bar:
        while len(kept) > n_layers:
            states = [model.embed(tokens)]
            for i in kept[:-1]:
                states.append(model.layers[i](states[-1], freqs, None, positions, mask))
            scores = []
            for j in range(len(kept)):
                scores.append(_kl_without(model, states, ref_logp, kept, j, mask, freqs, positions))
                bar.update()
            kept.pop(min(range(len(kept)), key=scores.__getitem__))
            bar.set_postfix(layers=len(kept))
    return kept


def prune_depth(model: Transformer, kept: list[int]) -> Transformer:
    """`model` keeping only the layers `kept` (in place; layer indices renumbered for the KV cache)."""
    model.layers = nn.ModuleList(model.layers[i] for i in kept)
    for new_idx, layer in enumerate(model.layers):
        layer.attn.layer_idx = new_idx
    model.cfg = dataclasses.replace(model.cfg, num_layers=len(kept))
    return model


# ------------------------------------------------------------------------------------------------------ width ---
def width_importance(model: Transformer, stats: CalibStats) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    """(embedding channel scores [H], per-layer MLP channel scores [I], per-layer query head scores [nh])."""
    lin = stats.linears
    hidden = sum(lin[f"layers.{i}.{n}"].channel_mean for i in range(model.cfg.num_layers) for n in
                 ("attn.qkv", "mlp.gate_up"))  # the RMSNorm outputs that feed each layer
    mlp = [lin[f"layers.{i}.mlp.down"].channel_mean for i in range(model.cfg.num_layers)]
    heads = [lin[f"layers.{i}.attn.o"].channel_mean.view(model.cfg.num_heads, -1).sum(-1)
             for i in range(model.cfg.num_layers)]
    return hidden, mlp, heads


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, in their original order."""
    return scores.topk(k).indices.sort().values


def kept_heads(scores: torch.Tensor, group: int, keep: int) -> torch.Tensor:
    """Per GQA group (query heads kv*G .. kv*G+G-1) its `keep` best heads; returns query head indices."""
    per_group = scores.view(-1, group)  # [KV, G]
    return torch.cat([kv * group + top(g, keep) for kv, g in enumerate(per_group)])


def new_linear(w: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """A `Linear` holding weight [out, in] (and bias [out])."""
    layer = Linear(w.shape[1], w.shape[0], bias is not None)
    layer.weight_t = nn.Parameter(w.contiguous().t(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.contiguous(), requires_grad=False)
    return layer


def _prune_layer(layer, cfg: ModelConfig, h: torch.Tensor, m: torch.Tensor, q_heads: torch.Tensor) -> None:
    """Keep hidden channels `h`, MLP channels `m` and query heads `q_heads` of one decoder layer (in place)."""
    D, H, KV = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q_rows = (q_heads[:, None] * D + torch.arange(D)).flatten()  # each head's rows (RoPE-interleaved within a head)
    rows = torch.cat([q_rows, torch.arange(H * D, (H + 2 * KV) * D)])  # kept q rows, all k and v rows
    attn, mlp = layer.attn, layer.mlp
    bias = None if attn.qkv.bias is None else attn.qkv.bias[rows]
    attn.qkv = new_linear(attn.qkv.weight[rows][:, h], bias)
    attn.o = new_linear(attn.o.weight[h][:, q_rows], None)
    attn.n_heads = len(q_heads)
    I = cfg.intermediate_size  # noqa: E741
    mlp.gate_up = new_linear(mlp.gate_up.weight[torch.cat([m, m + I])][:, h], None)
    mlp.down = new_linear(mlp.down.weight[h][:, m], None)
    for norm in (layer.attn_norm, layer.mlp_norm):
        norm.weight = nn.Parameter(norm.weight[h].contiguous(), requires_grad=False)


def prune_width(model: Transformer, stats: CalibStats, new_cfg: ModelConfig) -> Transformer:
    """`model` cut to `new_cfg`'s widths by `width_importance` (in place)."""
    cfg = model.cfg
    hidden, mlp, heads = width_importance(model, stats)
    h = top(hidden, new_cfg.hidden_size)
    for i, layer in enumerate(model.layers):
        q_heads = kept_heads(heads[i], cfg.group_size, new_cfg.group_size)
        _prune_layer(layer, cfg, h, top(mlp[i], new_cfg.intermediate_size), q_heads)
    model.embed.weight = nn.Parameter(model.embed.weight[:, h].contiguous(), requires_grad=False)
    model.norm.weight = nn.Parameter(model.norm.weight[h].contiguous(), requires_grad=False)
    head = model.embed.weight if cfg.tie_word_embeddings else model.lm_head.weight[:, h]
    model.lm_head = new_linear(head.detach().clone(), None)
    model.cfg = new_cfg
    return model


def config_updates(cfg: ModelConfig, kept_layers: list[int] | None) -> dict:
    """The config.json entries a pruned model changes (head_dim explicit: it no longer equals hidden/heads)."""
    out = {"num_hidden_layers": cfg.num_layers, "hidden_size": cfg.hidden_size,
           "intermediate_size": cfg.intermediate_size, "num_attention_heads": cfg.num_heads,
           "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim}
    if kept_layers is not None:
        from .distill import PRUNE_INFO_KEY

        out[PRUNE_INFO_KEY] = {"kept_layers": kept_layers}
    return out


def layers_within(cfg: ModelConfig, target: int) -> int:
    """The most layers a depth-pruned model may keep within `target` parameters."""
    return max(n for n in range(1, cfg.num_layers) if count_params(dataclasses.replace(cfg, num_layers=n)) <= target)


def run_prune(model: str, req: PruneRequest, output: str, data: list[str] | None = None, calib_samples: int = 8,
              calib_seq_len: int = 256, json_path: str | None = None) -> dict:
    """`optiserve prune`: calibrate, prune to `req.target_params`, write a plain HF checkpoint to `output`."""
    import json
    from pathlib import Path

    from transformers import AutoTokenizer

    from optiserve.engine.weight_set import WeightSet
    from optiserve.engine.weights import load_model, resolve_model_dir

    from .calibrate import calibrate
    from .data import default_calib_path, read_texts, token_windows
    from .export import export_checkpoint

    model_dir = resolve_model_dir(model)
    cfg = ModelConfig.from_dir(model_dir)
    check_target(cfg, req)  # before any loading: an impossible target fails fast
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = [t for path in (data or [default_calib_path()]) for t in read_texts(path, tokenizer)]
    windows = token_windows(tokenizer, texts, calib_seq_len, calib_samples)
    net = load_model(model_dir, calib_seq_len, torch.float32)
    kept = None
    if req.axis == "depth":
        kept = choose_layers(net, windows, layers_within(cfg, req.target_params))
        prune_depth(net, kept)
    else:
        prune_width(net, calibrate(net, windows), pick_width(cfg, req.target_params))
    out = export_checkpoint(model_dir, WeightSet(net), Path(output), config_updates=config_updates(net.cfg, kept))
    summary = {"command": "prune", "model": model, "axis": req.axis, "target_params": req.target_params,
               "params_before": count_params(cfg), "params_after": count_params(net.cfg),
               "layers": net.cfg.num_layers, "hidden_size": net.cfg.hidden_size,
               "intermediate_size": net.cfg.intermediate_size, "num_heads": net.cfg.num_heads,
               "kept_layers": kept, "output": str(out)}
    print(f"pruned {summary['params_before']:,} -> {summary['params_after']:,} parameters ({req.axis}); wrote {out}")
    if json_path:
        Path(json_path).write_text(json.dumps(summary, indent=2))
    return summary
