"""The model runner: builds positions and masks, and runs `prefill` and `decode` steps over the KV cache."""

from __future__ import annotations

import torch

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

    def _forward(self, first_slot: int, tokens: torch.Tensor, positions: torch.Tensor, all_logits: bool):
        cfg = self.model.cfg
        attn_len = int(positions.max()) + 1
        self.cache.begin(first_slot, tokens.shape[0], attn_len)
        mask = attention_mask(positions, attn_len, cfg.group_size, cfg.sliding_window)
        return self.model(tokens, positions, self.cache, mask, all_logits=all_logits)

    @torch.inference_mode()
    def prefill(self, slot: int, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Process a whole prompt into `slot`; logits [S, V] if `all_logits`, else [V] for the last token."""
        tokens = torch.tensor([token_ids], device=self.device)  # [1, S]
        positions = torch.arange(len(token_ids), device=self.device).unsqueeze(0)
        logits = self._forward(slot, tokens, positions, all_logits)
        return logits[0]

    @torch.inference_mode()
    def decode(self, last_tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each of the sequences in slots [0, B); returns logits [B, V]."""
        tokens = torch.tensor(last_tokens, device=self.device).unsqueeze(1)  # [B, 1]
        pos = torch.tensor(positions, device=self.device).unsqueeze(1)  # [B, 1]
        return self._forward(0, tokens, pos, all_logits=False)
