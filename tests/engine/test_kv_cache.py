"""KV cache slot operations: writes land at their positions, compaction moves exactly, truncation zeroes."""

import torch

from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.runner import attention_mask


def make_cache() -> KVCache:
    return KVCache(CacheShape(num_layers=2, num_slots=3, num_kv_heads=2, max_len=8, head_dim=4), torch.float32)


def test_update_writes_positions_and_returns_window():
    cache = make_cache()
    cache.begin(1, 2, attn_len=5)
    k = torch.randn(2, 3, 2, 4)  # [B, S, KV, D]
    v = torch.randn(2, 3, 2, 4)
    positions = torch.tensor([[0, 1, 2], [2, 3, 4]])
    keys, values = cache.update(0, positions, k, v)
    assert keys.shape == (2, 2, 5, 4)
    assert torch.equal(cache.k[0, 1, :, 0:3], k[0].transpose(0, 1))
    assert torch.equal(cache.v[0, 2, :, 2:5], v[1].transpose(0, 1))
    assert cache.k[0, 0].abs().sum() == 0  # other slots untouched


def test_move_and_truncate():
    cache = make_cache()
    cache.k.normal_()
    cache.v.normal_()
    src = cache.k[:, 2, :, :5].clone()
    cache.move(2, 0, 5)
    assert torch.equal(cache.k[:, 0, :, :5], src)
    cache.truncate(0, 3, 5)
    assert cache.k[:, 0, :, 3:5].abs().sum() == 0 and torch.equal(cache.k[:, 0, :, :3], src[:, :, :3])


def test_attention_mask_causal_window_and_gqa_layout():
    mask = attention_mask(torch.tensor([[3, 4]]), attn_len=5, group=2, window=2)  # [1, 1, 2*2, 5]
    row3 = [False, False, True, True, False]
    row4 = [False, False, False, True, True]
    assert mask.shape == (1, 1, 4, 5)
    assert mask[0, 0].tolist() == [row3, row4, row3, row4]
