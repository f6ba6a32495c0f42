"""Engine-side quantization: compute copies hold exactly the format's values; the KV cache stores its format."""

import pytest
import torch

from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.quant import QuantLinear, fake_quant_kv, kv_scale_for, quantize_weight

FORMATS = ["fp8", "nvfp4", "nvfp4-w4a16", "int8", "int4"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_compute_copy_is_exactly_the_dequantized_format(fmt):
    torch.manual_seed(0)
    w_q, w_k = torch.randn(64, 256), torch.randn(32, 256)
    shards = [quantize_weight(fmt, w_q), quantize_weight(fmt, w_k)]
    layer = QuantLinear(fmt, shards, None, torch.tensor(0.05), None, torch.float32)
    expected = torch.cat([s.dequantize(torch.float32) for s in shards])  # [96, 256]
    assert torch.equal(layer.weight, expected)
    assert layer.packed_bytes() < expected.numel() * 2  # smaller than bf16 for every format


def test_activation_quantization_changes_inputs_only_for_w_a_formats():
    torch.manual_seed(0)
    w, x = torch.randn(16, 64), torch.randn(3, 64)
    for fmt, quantizes in (("nvfp4", True), ("nvfp4-w4a16", False)):
        layer = QuantLinear(fmt, [quantize_weight(fmt, w)], None, torch.tensor(x.abs().max().item() / 2688), None,
                            torch.float32)
        unquantized_input = x @ layer.weight.t()
        differs = (layer(x) - unquantized_input).abs().max().item() > 1e-3  # W4A4 moves outputs far more
        assert differs == quantizes


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_kv_cache_stores_the_format(fmt):
    torch.manual_seed(0)
    cache = KVCache(CacheShape(num_layers=1, num_slots=1, num_kv_heads=2, max_len=8, head_dim=32), torch.float32)
    k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    scales = [kv_scale_for(fmt, k.abs().amax())], [kv_scale_for(fmt, v.abs().amax())]
    cache.set_format(fmt, *scales)
    cache.begin(0, 1, 4)
    keys, values = cache.update(0, torch.arange(4)[None], k, v)
    assert torch.equal(keys[0].transpose(0, 1), fake_quant_kv(fmt, k, scales[0][0])[0])
    assert not torch.equal(keys[0].transpose(0, 1), k[0])  # quantization did change the values
    assert cache.packed_bytes_per_token() <= 0.30 * cache.shape.bytes_per_token * 2 or fmt == "fp8"  # vs bf16
