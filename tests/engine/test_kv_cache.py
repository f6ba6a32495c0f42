"""The paged KV cache: writes land in the blocks of their slot's table, slot moves copy nothing, rollback frees."""

import pytest
import torch

from optiserve.engine.block_manager import NoFreeBlocks
from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.runner import attention_mask


def make_cache(block_size: int = 2) -> KVCache:
    shape = CacheShape(num_layers=2, num_slots=3, num_kv_heads=2, max_len=8, head_dim=4, block_size=block_size)
    return KVCache(shape, torch.float32)


def test_update_writes_positions_through_block_tables_and_window_reads_them_back():
    cache = make_cache()
    cache.begin(0, [1])  # slot 0 takes block 0: slot 1's blocks are not the first ones
    cache.begin(1, [3, 5])
    k = torch.randn(2, 3, 2, 4)  # [B, S, KV, D]
    v = torch.randn(2, 3, 2, 4)
    positions = torch.tensor([[0, 1, 2], [2, 3, 4]])
    cache.update(0, positions, k, v)
    keys, values = cache.window(0)  # [B, KV, L, D]
    assert keys.shape == (2, 2, 5, 4)
    assert torch.equal(keys[0, :, 0:3], k[0].transpose(0, 1))
    assert torch.equal(values[1, :, 2:5], v[1].transpose(0, 1))
    assert torch.equal(cache.read(2, 5)[1][0, 2:5], v[1])
    assert cache.tables.tables[1].blocks == [1, 2] and cache.tables.tables[2].blocks == [3, 4, 5]
    assert cache.k[0, 0].abs().sum() == 0  # slot 0's block untouched


def test_move_truncate_and_free_return_every_block():
    cache = make_cache()
    pool = cache.tables.pool
    cache.begin(0, [4, 7])
    cache.k.normal_()
    src = cache.read(1, 7)[0].clone()
    cache.tables.free(0)
    cache.tables.move(1, 0)
    assert torch.equal(cache.read(0, 7)[0], src)  # the table moved, the KV did not
    cache.truncate(0, 3)
    assert len(cache.tables.tables[0].blocks) == 2 and torch.equal(cache.read(0, 3)[0], src[:, :3])
    cache.tables.free(0)
    assert pool.num_free == pool.num_blocks


def test_a_pool_smaller_than_the_slots_refuses_blocks_it_does_not_have():
    cache = KVCache(CacheShape(1, 2, 1, 8, 4, block_size=4, num_blocks=3), torch.float32)
    cache.begin(0, [8])
    with pytest.raises(NoFreeBlocks):
        cache.begin(1, [5])
    assert cache.tables.tables[1].blocks == []  # all or nothing


def test_attention_mask_causal_window_and_gqa_layout():
    mask = attention_mask(torch.tensor([[3, 4]]), attn_len=5, group=2, window=2)  # [1, 1, 2*2, 5]
    row3 = [False, False, True, True, False]
    row4 = [False, False, False, True, True]
    assert mask.shape == (1, 1, 4, 5)
    assert mask[0, 0].tolist() == [row3, row4, row3, row4]
