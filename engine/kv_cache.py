"""A slot-based KV cache: one fixed row of `max_len` positions per running sequence.

Sequences in a forward occupy a contiguous run of slots, so attention reads a plain view of the cache
(no gather copy). The scheduler keeps running sequences packed in slots 0..n-1 by moving the last
sequence into a finished one's slot (`move`), which copies one sequence's KV once, at a step boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    max_len: int
    head_dim: int

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token across all layers, at 4 bytes per element is the fp32 figure."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim


class KVCache:
    """K/V tensors [layers, slots, kv_heads, max_len, head_dim] plus the window of the current forward."""

    def __init__(self, shape: CacheShape, dtype: torch.dtype, device: str | torch.device = "cpu"):
        self.shape = shape
        dims = (shape.num_layers, shape.num_slots, shape.num_kv_heads, shape.max_len, shape.head_dim)
        self.k = torch.zeros(dims, dtype=dtype, device=device)
        self.v = torch.zeros(dims, dtype=dtype, device=device)
        self._rows = slice(0, 1)
        self._attn_len = 1

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.shape.bytes_per_token * self.k.element_size()

    def begin(self, first_slot: int, batch: int, attn_len: int) -> None:
        """Select the slots [first_slot, first_slot+batch) and attention length for the next forward."""
        assert first_slot >= 0 and first_slot + batch <= self.shape.num_slots, (first_slot, batch)
        assert 0 < attn_len <= self.shape.max_len, attn_len
        self._rows = slice(first_slot, first_slot + batch)
        self._attn_len = attn_len

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, S, KV, D] at `positions` [B, S]; return this layer's keys/values [B, KV, L, D]."""
        k_rows, v_rows = self.k[layer, self._rows], self.v[layer, self._rows]  # [B, KV, max_len, D]
        batch_idx = torch.arange(k.shape[0], device=k.device).unsqueeze(1)  # [B, 1]
        k_rows[batch_idx, :, positions] = k  # advanced dims first: [B, S, KV, D]
        v_rows[batch_idx, :, positions] = v
        return k_rows[:, :, : self._attn_len], v_rows[:, :, : self._attn_len]

    def move(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy the first `length` positions of one slot into another (slot compaction)."""
        self.k[:, dst_slot, :, :length] = self.k[:, src_slot, :, :length]
        self.v[:, dst_slot, :, :length] = self.v[:, src_slot, :, :length]

    def truncate(self, slot: int, start: int, end: int) -> None:
        """Zero positions [start, end) of a slot, as if they were never written (rollback)."""
        self.k[:, slot, :, start:end] = 0
        self.v[:, slot, :, start:end] = 0
