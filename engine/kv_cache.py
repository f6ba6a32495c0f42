"""A slot-based KV cache: one fixed row of `max_len` positions per running sequence.

Sequences in a forward occupy a contiguous run of slots, so attention reads a plain view of the cache
(no gather copy). The scheduler keeps running sequences packed in slots 0..n-1 by moving the last
sequence into a finished one's slot (`move`), which copies one sequence's KV once, at a step boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .kv_quant import KVFormat


@dataclass
class CacheShape:
    num_layers: int
    num_slots: int
    num_kv_heads: int
    max_len: int
    head_dim: int

    @property
    def elements_per_token(self) -> int:
        """Elements of K and V for one token across all layers (times an element's bytes: the bytes)."""
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
        self.kv = KVFormat()
        self._index_of: torch.Tensor | None = None  # the `positions` that `_index` was built for
        self._index = torch.empty(0, dtype=torch.long)
        # Per layer, the cache viewed as rows [slots * kv_heads * max_len, D] (writes); per forward, all layers'
        # windows [layers, B, KV, L, D] (reads). Views made once, so a layer's update is 2 copies and 2 selects.
        self._k_rows = [t.view(-1, shape.head_dim) for t in self.k]
        self._v_rows = [t.view(-1, shape.head_dim) for t in self.v]
        self._k_window, self._v_window = self.k, self.v

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def bytes_per_token(self) -> int:
        return self.shape.elements_per_token * self.k.element_size()

    @property
    def kv_format(self) -> str:
        return self.kv.name

    def set_format(self, kv: KVFormat) -> None:
        """Quantize K/V as they are written (`fp8`/`nvfp4`, calibrated per layer) or not (`none`)."""
        self.kv = kv

    def packed_bytes_per_token(self) -> float:
        """Bytes per token of K and V in the cache's format (the fp32 compute copy is `bytes_per_token`)."""
        if self.kv.name == "none":
            return float(self.bytes_per_token)
        return self.shape.elements_per_token * self.kv.bytes_per_element

    def begin(self, first_slot: int, batch: int, attn_len: int) -> None:
        """Select the slots [first_slot, first_slot+batch) and attention length for the next forward."""
        assert first_slot >= 0 and first_slot + batch <= self.shape.num_slots, (first_slot, batch)
        assert 0 < attn_len <= self.shape.max_len, attn_len
        self._rows = slice(first_slot, first_slot + batch)
        self._attn_len = attn_len
        self._index_of = None
        self._k_window = self.k[:, self._rows, :, :attn_len]
        self._v_window = self.v[:, self._rows, :, :attn_len]

    def _flat_index(self, positions: torch.Tensor) -> torch.Tensor:
        """Row indices into a layer's cache viewed as [slots * kv_heads * max_len, D] for `positions` [B, S],
        ordered (b, s, head) like k.reshape(-1, D). Built once per forward: every layer writes the same places."""
        if positions is not self._index_of:
            slots = torch.arange(self._rows.start, self._rows.stop, device=positions.device)
            heads = torch.arange(self.shape.num_kv_heads, device=positions.device)
            base = (slots[:, None, None] * self.shape.num_kv_heads + heads) * self.shape.max_len  # [B, 1, KV]
            self._index = (base + positions[:, :, None]).flatten()
            self._index_of = positions
        return self._index

    def update(
        self, layer: int, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, S, KV, D] at `positions` [B, S]; return this layer's keys/values [B, KV, L, D]."""
        if self.kv.name != "none":  # store exactly what the quantized cache would hold
            k, v = self.kv.store_keys(layer, k), self.kv.store_values(layer, v)
        index, D = self._flat_index(positions), self.shape.head_dim
        self._k_rows[layer].index_copy_(0, index, k.reshape(-1, D).to(self.k.dtype))
        self._v_rows[layer].index_copy_(0, index, v.reshape(-1, D).to(self.v.dtype))
        return self._k_window[layer], self._v_window[layer]

    def move(self, src_slot: int, dst_slot: int, length: int) -> None:
        """Copy the first `length` positions of one slot into another (slot compaction)."""
        self.k[:, dst_slot, :, :length] = self.k[:, src_slot, :, :length]
        self.v[:, dst_slot, :, :length] = self.v[:, src_slot, :, :length]

    def truncate(self, slot: int, start: int, end: int) -> None:
        """Zero positions [start, end) of a slot, as if they were never written (rollback)."""
        self.k[:, slot, :, start:end] = 0
        self.v[:, slot, :, start:end] = 0

    def keep_path(self, slot: int, start: int, rows: list[int], end: int) -> None:
        """Keep a draft tree's accepted path: the rows at start + rows[i] (ascending, rows[0] == 0) move to start + i,
        and every other position up to `end` is zeroed, as if only the path had been written."""
        for i, r in enumerate(rows):
            if r != i:  # r > i: moving in ascending order never overwrites a row still to move
                self.k[:, slot, :, start + i] = self.k[:, slot, :, start + r]
                self.v[:, slot, :, start + i] = self.v[:, slot, :, start + r]
        self.truncate(slot, start + len(rows), end)
