"""The model runner: builds positions and masks, and runs `prefill` and `decode` steps over the KV cache."""

from __future__ import annotations

import torch

from . import cpu_kernels
from .kv_cache import CacheShape, KVCache
from .model import Transformer


def attention_mask(positions: torch.Tensor, attn_len: int, group: int, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask for queries at `positions` [B, S] over keys [0, attn_len).

    Returns a bool mask [B, 1, G*S, L] matching the model's GQA layout, G query heads per KV head.
    """
    B, S = positions.shape
    keys = torch.arange(attn_len, device=positions.device)  # [L]
    allowed = keys <= positions.unsqueeze(-1)  # [B, S, L]
    if window is not None:
        allowed &= keys > positions.unsqueeze(-1) - window
    return allowed[:, None, None].expand(B, 1, group, S, attn_len).reshape(B, 1, group * S, attn_len)


class ModelRunner:
    """Owns the model and its KV cache; every forward goes through here."""

    def __init__(self, model: Transformer, num_slots: int, max_len: int, dtype: torch.dtype):
        self.model = model
        cfg = model.cfg
        self.max_len = max_len
        self.cache = KVCache(CacheShape(cfg.num_layers, num_slots, cfg.num_kv_heads, max_len, cfg.head_dim), dtype)
        self.device = model.embed.weight.device
        # One-token steps need no mask when the decode-attention kernel runs (it bounds each row by its position),
        # nor for a single row without a sliding window (its keys [0, attn_len) are exactly the allowed ones).
        self.unmasked_decode = cpu_kernels.decode_attention_available(dtype, self.device)

    def _forward(self, first_slot: int, tokens: torch.Tensor, positions: torch.Tensor, attn_len: int, all_logits: bool):
        cfg = self.model.cfg
        B, S = positions.shape
        self.cache.begin(first_slot, B, attn_len)
        if S == 1 and (self.unmasked_decode or (B == 1 and cfg.sliding_window is None)):
            mask = None
        else:
            mask = attention_mask(positions, attn_len, cfg.group_size, cfg.sliding_window)
        return self.model(tokens, positions, self.cache, mask, all_logits=all_logits)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Process a whole prompt into `slot`; logits [S, V] if `all_logits`, else [V] for the last token."""
        tokens = torch.tensor([token_ids], device=self.device)  # [1, S]
        positions = torch.arange(len(token_ids), device=self.device).unsqueeze(0)
        logits = self._forward(slot, tokens, positions, len(token_ids), all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of the sequences in slots [0, B); returns logits [B, V]."""
        tokens = torch.tensor([[t] for t in last_tokens], device=self.device)  # [B, 1]
        pos = torch.tensor([[p] for p in positions], device=self.device)  # [B, 1]
        return self._forward(0, tokens, pos, max(positions) + 1, all_logits=False)
