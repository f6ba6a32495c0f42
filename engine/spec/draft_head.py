"""An EAGLE-3-style draft head: one decoder layer over fused target features, predicting a reduced vocabulary.

Inputs at draft position t: the target's hidden states after a low, a middle and a high layer at t, fused to H by
`fc` (or, on later draft steps, the head's own output state at t), and the embedding of token t+1 (the target's
embedding, shared, not stored). The decoder layer reads [embed_norm(e) | hidden_norm(h)] (2H wide) and keeps h as
its residual. The LM head covers only the `draft_vocab_size` most frequent target tokens: for a 135M target the
full head would be a fifth of the model, and a draft step must cost a small fraction of a target step.
`d2t` maps draft ids to target ids.

Stored as `draft_config.json` + `model.safetensors` (bf16) in a directory.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .. import ops, packed_linear
from ..config import ModelConfig
from ..kv_cache import KVCache
from ..lm_head import LowPrecisionLinear
from ..model import MLP, Attention, Linear, RMSNorm, Transformer
from ..tree_attention import TreeMask

CONFIG_FILE = "draft_config.json"
WEIGHTS_FILE = "model.safetensors"

# DraftHead -> (the tensors its stack was built from, its `HeadStack`): beside the module, so copying a head never
# copies a stack.
_HEAD_STACKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class DraftConfig:
    """Shape of a draft head; `target_layers` are the target layers whose outputs it reads (low, mid, high)."""

    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    target_vocab_size: int
    draft_vocab_size: int
    target_layers: tuple[int, int, int]

    def __post_init__(self) -> None:
        self.target_layers = tuple(self.target_layers)
        if len(self.target_layers) != 3:
            raise ValueError(f"a draft head reads 3 target layers, not {self.target_layers}")
        if not 0 < self.draft_vocab_size <= self.target_vocab_size:
            raise ValueError(f"draft_vocab_size must be in (0, {self.target_vocab_size}]")

    @classmethod
    def for_target(cls, target: ModelConfig, draft_vocab_size: int) -> DraftConfig:
        """The default head for a target: its attention/MLP shapes, layers (1, L/2 - 1, L - 4) as in EAGLE-3."""
        L = target.num_layers
        return cls(target.hidden_size, target.num_heads, target.num_kv_heads, target.head_dim,
                   target.intermediate_size, target.rms_norm_eps, target.vocab_size, draft_vocab_size,
                   (1, L // 2 - 1, L - 4))

    def layer_config(self) -> ModelConfig:
        """The decoder layer's shapes as a `ModelConfig`, so it is built from the target's own modules."""
        return ModelConfig("llama", self.draft_vocab_size, self.hidden_size, self.intermediate_size, 1,
                           self.num_heads, self.num_kv_heads, self.head_dim, self.rms_norm_eps, 0.0, 0, False)


class DraftHead(nn.Module):
    """The head's parameters and its one-step forward; the target supplies embeddings and RoPE (`attach`)."""

    def __init__(self, cfg: DraftConfig):
        super().__init__()
        self.cfg = cfg
        H, lc = cfg.hidden_size, cfg.layer_config()
        self.fc = Linear(3 * H, H)
        self.embed_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.attn = Attention(lc, 0)
        self.attn.qkv = Linear(2 * H, self.attn.qkv.weight_t.shape[1])  # reads [embedding | hidden]
        self.mlp_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = MLP(lc)
        self.norm = RMSNorm(H, cfg.rms_norm_eps)
        self.lm_head = Linear(H, cfg.draft_vocab_size)
        self.register_buffer("d2t", torch.arange(cfg.draft_vocab_size), persistent=True)  # draft id -> target id
        self._target: list[Transformer] = []  # a list, so the target is not registered as a submodule

    def attach(self, target: Transformer) -> DraftHead:
        """Use `target`'s embedding and RoPE table (shared, never copied)."""
        if target.cfg.hidden_size != self.cfg.hidden_size or target.cfg.vocab_size != self.cfg.target_vocab_size:
            raise ValueError("this draft head was trained for a target of a different shape")
        self._target = [target]
        return self

    @property
    def target(self) -> Transformer:
        if not self._target:
            raise RuntimeError("attach the draft head to its target first")
        return self._target[0]

    def fuse(self, features: torch.Tensor) -> torch.Tensor:
        """Target features [..., 3H] (low|mid|high layer outputs) -> the head's hidden input [..., H]."""
        return self.fc(features.to(self.norm.weight.dtype))

    def forward(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """One layer over `tokens` [B, S] (token t+1 at draft position t) and `hidden` [B, S, H]; returns the
        output states [B, S, H] (the next draft step's `hidden`; `logits` turns them into predictions)."""
        target = self.target
        freqs = target.rope_table[positions]  # [B, S, D/2, 2]
        x = torch.cat([self.embed_norm(target.embed(tokens)), self.hidden_norm(hidden)], dim=-1)  # [B, S, 2H]
        h = hidden + self.attn(x, freqs, cache, positions, mask)
        return h + self.mlp(self.mlp_norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary logits [..., Vd] (fp32) from output states [..., H]."""
        return self.lm_head(self.norm(h)).float()

    def step(
        self,
        tokens: torch.Tensor,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | TreeMask | None,
        with_logits: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`forward` over the cache, then (`with_logits`) `logits` of every output state: (states [B, S, H], logits
        [B, S, Vd] or None). One kernel call where `head_stack` applies, else the modules: the same bits."""
        stack = self.head_stack(hidden, cache, mask)
        if stack is None:
            h = self(tokens, hidden, positions, cache, mask)
            return h, self.logits(h) if with_logits else None
        tree = mask if isinstance(mask, TreeMask) else None
        slots = positions if tree is None else tree.slots  # where rows are written (a tree's share positions)
        h, *logits = packed_linear.load().draft_head_step(
            stack, tokens, hidden, self.target.rope_table[positions], cache.k, cache.v, cache.token_rows(slots),
            cache.block_table, slots, *ops.tree_operands(tree), with_logits)
        return h, logits[0] if with_logits else None

    def head_stack(self, hidden: torch.Tensor, cache: KVCache, mask):
        """The packed kernel's `HeadStack` when `draft_head_step` computes this step: every linear a packed or
        bf16 one the kernel takes (`with_serving_linears`), rows attending through the kernel (`mask` None, or a tree
        it reads), an unquantized fp32 KV pool; else None. Built once per set of weights and target embedding."""
        kernel_tree = isinstance(mask, TreeMask) and mask.dense is None
        if ((mask is not None and not kernel_tree) or cache.kv_format != "none" or cache.k.dtype != torch.float32
                or hidden.requires_grad or hidden.dtype != torch.float32 or not hidden.is_contiguous()):
            return None
        linears = [getattr(m, "fused", None) for m in (self.attn.qkv, self.attn.o, self.mlp.gate_up, self.mlp.down,
                                                        self.lm_head)]
        if None in linears:
            return None
        made_from = [*linears, self.target.embed.weight]
        held = _HEAD_STACKS.get(self)
        if held is not None and all(a is b for a, b in zip(held[0], made_from, strict=True)):
            return held[1]
        stack = packed_linear.load().HeadStack(
            self.target.embed.weight, self.embed_norm.weight, self.hidden_norm.weight, self.mlp_norm.weight,
            self.norm.weight, *linears, self.cfg.rms_norm_eps, self.attn.n_heads, self.attn.n_kv, self.attn.window)
        _HEAD_STACKS[self] = (made_from, stack)
        return stack

    def save(self, out_dir: str | Path, extra: dict | None = None) -> None:
        """Write `draft_config.json` (+ `extra` fields, e.g. training provenance) and bf16 safetensors."""
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to(torch.bfloat16 if v.is_floating_point() else v.dtype).contiguous()
                 for k, v in self.state_dict().items()}
        state = {k.replace("weight_t", "weight"): (v.t().contiguous() if k.endswith("weight_t") else v)
                 for k, v in state.items()}  # stored [out, in], as checkpoints usually are
        save_file(state, str(out / WEIGHTS_FILE))
        (out / CONFIG_FILE).write_text(json.dumps({**asdict(self.cfg), **(extra or {})}, indent=2) + "\n")


def is_draft_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def load_draft_head(path: str | Path, dtype: torch.dtype = torch.float32) -> DraftHead:
    """Load a head written by `DraftHead.save`, weights in `dtype` laid out for the engine's kernels."""
    from safetensors.torch import load_file

    path = Path(path)
    if not is_draft_dir(path):
        raise ValueError(f"{path}: not a draft head directory (no {CONFIG_FILE})")
    raw = json.loads((path / CONFIG_FILE).read_text())
    fields = DraftConfig.__dataclass_fields__
    head = DraftHead(DraftConfig(**{k: v for k, v in raw.items() if k in fields}))
    ours = head.state_dict()  # references to the parameters: copying into them loads (and keeps the layout)
    stored = load_file(str(path / WEIGHTS_FILE))
    if len(stored) != len(ours):
        raise ValueError(f"{path}: {len(stored)} tensors, the head has {len(ours)}")
    for name, value in stored.items():
        transposed = name.removesuffix("weight") + "weight_t"
        if transposed in ours:
            ours[transposed].copy_(value.t())
        elif name in ours:
            ours[name].copy_(value)
        else:
            raise ValueError(f"{path}: unexpected tensor {name!r}")
    return head.to(dtype).eval()


def with_serving_linears(head: DraftHead, dtype: str) -> DraftHead:
    """`head` (in place) with its linears held in `dtype` (`--speculative-draft-dtype`, the LM head's choices) for the
    packed kernel, where it runs (fp32 on the CPU): bfloat16 keeps the values the head is saved with, int8 halves
    them again (per-channel scales); a draft step reads every weight once, so its bytes bound it. The products stay
    fp32. Serving's form of the head; float32, and training, keep the `Linear`s."""
    if (dtype == "float32" or head.norm.weight.dtype != torch.float32 or not head.norm.weight.is_cpu
            or packed_linear.load() is None):
        return head
    for name, module in list(head.named_modules()):
        if isinstance(module, Linear) and module.bias is None:
            parent, _, attr = name.rpartition(".")
            setattr(head.get_submodule(parent), attr, LowPrecisionLinear(dtype, module.weight))
    return head
