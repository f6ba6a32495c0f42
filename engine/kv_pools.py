"""The storage of a paged KV cache in its format: per layer, K and V pools [num_blocks, block_size, KV, width].

`none` holds K/V as computed (the cache's dtype, width D). FP8 holds E4M3 codes (uint8, width D) and NVFP4 packed
E2M1 nibbles (uint8, width D/2) plus E4M3 block scales (uint8 [.., D/16]); their per-layer scales, mean keys and
rotation live in the `KVFormat` (kv_quant.py). So resident bytes per token are the format's. A token's codes and
scales sit in its own row: no scale spans positions, and moving a row moves the token whatever its block.
"""

from __future__ import annotations

import torch

from . import ops
from .kv_quant import KVFormat, KVPages


class KVPools:
    """Every layer's K and V pools in one format (`kv`), as token rows [layers, num_blocks * block_size, KV, width]."""

    def __init__(self, dims: tuple[int, int, int, int, int], dtype: torch.dtype, device: torch.device | str,
                 kv: KVFormat):
        """`dims` (layers, num_blocks, block_size, KV, D): the shape of an unquantized pool."""
        self.kv, self.dtype, self.head_dim = kv, dtype, dims[-1]
        fmt = kv.format
        self.k_scales = self.v_scales = None
        if fmt is None:
            self.k, self.v = (torch.zeros(dims, dtype=dtype, device=device) for _ in "kv")
            return
        codes = (*dims[:-1], int(dims[-1] * fmt.code_bytes))
        self.k, self.v = (torch.zeros(codes, dtype=torch.uint8, device=device) for _ in "kv")
        if fmt.scale_block:
            scales = (*dims[:-1], dims[-1] // fmt.scale_block)
            self.k_scales, self.v_scales = (torch.zeros(scales, dtype=torch.uint8, device=device) for _ in "kv")

    @property
    def tensors(self) -> list[torch.Tensor]:
        """Everything a token's K/V occupies: codes (or values) and block scales, K and V."""
        return [t for t in (self.k, self.v, self.k_scales, self.v_scales) if t is not None]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k/v [B, S, KV, D] into token rows `rows` [B * S] of `layer`'s pools, encoded in the format."""
        if self.kv.format is None:
            ops.kv_store(k, v, rows, self.k[layer], self.v[layer])
            return
        for keys, codes, scales, t in ((True, self.k, self.k_scales, k), (False, self.v, self.v_scales, v)):
            enc = self.kv.encoding(layer, keys, self.head_dim)
            ops.kv_write(enc, t, rows, _rows(codes[layer]), None if scales is None else _rows(scales[layer]))

    def pages(self, layer: int) -> tuple[torch.Tensor | KVPages, torch.Tensor | KVPages]:
        """`layer`'s K and V pools [num_blocks, block_size, KV, *] as the attention kernel reads them."""
        if self.kv.format is None:
            return self.k[layer], self.v[layer]
        return tuple(KVPages(codes[layer], None if scales is None else scales[layer],
                             self.kv.encoding(layer, keys, self.head_dim))
                     for keys, codes, scales in ((True, self.k, self.k_scales), (False, self.v, self.v_scales)))

    def decoded(self, layer: int, keys: bool, index) -> torch.Tensor:
        """The values (in the keys' own basis) at `index` of `layer`'s K or V pool, indexed as [num_blocks, ...]:
        [*index's shape, KV, D] in the cache dtype."""
        codes, scales = (self.k, self.k_scales) if keys else (self.v, self.v_scales)
        if self.kv.format is None:
            return codes[layer][index]
        enc = self.kv.encoding(layer, keys, self.head_dim)
        return enc.decode(codes[layer][index], None if scales is None else scales[layer][index]).to(self.dtype)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks `src` to `dst` in every layer (codes and scales alike)."""
        for t in self.tensors:
            t[:, dst] = t[:, src]

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy token rows `src` to `dst` in every layer (codes and scales alike)."""
        for t in self.tensors:
            flat = t.view(t.shape[0], -1, *t.shape[3:])
            flat[:, dst] = flat[:, src]  # gathered before written, as moving in ascending order would be


def _rows(pool: torch.Tensor) -> torch.Tensor:
    """A layer's pool [num_blocks, block_size, KV, W] as token rows [num_blocks * block_size, KV, W]."""
    return pool.view(-1, *pool.shape[2:])
