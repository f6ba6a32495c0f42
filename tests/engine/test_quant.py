"""Engine-side quantization: compute copies hold exactly the format's values; the KV cache stores its format."""

import pytest
import torch

from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.kv_quant import KVFormat, hadamard, kv_scale_for, kv_scale_from_modelopt, kv_scale_to_modelopt
from optiserve.engine.quant import QuantLinear, quantize_weight
from optiserve.kernels.fp8 import FP8Tensor
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv

FORMATS = ["fp8", "nvfp4", "nvfp4-w4a16", "int8", "int4", "int4-w4a8"]


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


def _store(fmt: str, k: torch.Tensor, v: torch.Tensor, k_mean: torch.Tensor | None) -> tuple[KVCache, torch.Tensor]:
    """Write k/v [1, S, KV, D] into a fresh one-layer cache of `fmt`; return it and the stored keys [S, KV, D]."""
    cache = KVCache(CacheShape(num_layers=1, num_slots=1, num_kv_heads=k.shape[2], max_len=8, head_dim=k.shape[3]),
                    torch.float32)
    means = None if k_mean is None else [k_mean]
    cache.set_format(KVFormat(fmt, [kv_scale_for(fmt, k.abs().amax())], [kv_scale_for(fmt, v.abs().amax())], means))
    cache.begin(0, [k.shape[1]])
    cache.update(0, torch.arange(k.shape[1])[None], k, v)
    return cache, cache.read(0, k.shape[1])[0][0]


def test_fp8_kv_cache_stores_modelopt_fp8():
    torch.manual_seed(0)
    k, v = torch.randn(1, 4, 2, 32), torch.randn(1, 4, 2, 32)
    _, keys = _store("fp8", k, v, None)
    assert torch.equal(keys, FP8Tensor.from_float(k, kv_scale_for("fp8", k.abs().amax())).dequantize()[0])


def test_nvfp4_kv_cache_stores_rotated_centred_keys():
    """The cache holds H^T NVFP4(H (k - m)) + m: decode the stored codes, rotate back, add the mean."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 4, 2, 32) + torch.linspace(-3, 3, 32), torch.randn(1, 4, 2, 32)
    mean = k[0].mean(0)  # [KV, D]
    cache, keys = _store("nvfp4", k, v, mean)
    rot, s2 = hadamard(32), kv_scale_for("nvfp4", k.abs().amax())
    assert torch.allclose(rot @ rot, torch.eye(32), atol=1e-6) and torch.equal(rot, rot.t())
    codes = quantize_nvfp4_kv((k[0] - mean) @ rot, s2)
    assert torch.allclose(keys, codes.dequantize() @ rot + mean, rtol=0, atol=1e-6)
    assert not torch.equal(keys, k[0])  # quantization did change the values
    assert cache.packed_bytes_per_token() <= 0.30 * cache.shape.elements_per_token * 2  # vs bf16


@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
def test_kv_scales_round_trip_through_modelopt_k_scale_exactly(fmt):
    """Export writes ModelOpt's amax/448 and loading turns it back into our scale: bit for bit, for any amax."""
    amaxes = torch.rand(2000, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 2000)
    for amax in amaxes:
        ours = kv_scale_for(fmt, amax)
        assert torch.equal(kv_scale_from_modelopt(fmt, kv_scale_to_modelopt(fmt, ours)), ours), float(amax)


def test_nvfp4_kv_rotation_needs_a_power_of_two_head_dim():
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        hadamard(48)


def plain_nvfp4_cache(kv: KVFormat) -> KVFormat:
    """The baseline: ModelOpt's NVFP4 encoding of K and V as computed (amax block scales, no centring/rotation)."""
    return KVFormat("nvfp4", kv.k_scales, kv.v_scales, None, rotate_keys=False, search_scales=False)


def test_nvfp4_kv_encoding_beats_plain_nvfp4_on_the_real_model(engine, chat_prompt_ids):
    """On the default model's own keys and values, the cache's encoding is closer to the unquantized model (KL of
    next-token distributions) than ModelOpt's plain NVFP4 encoding with the same calibrated scales."""
    from optiserve.optimize.calibrate import calibrate
    from optiserve.optimize.evaluate import evaluate
    from optiserve.optimize.ptq_pipeline import kv_format_for

    model = engine.master
    windows = [ids for ids in chat_prompt_ids if len(ids) >= 16][:4]
    ours = kv_format_for("nvfp4", calibrate(model, windows[:2], progress=False))
    plain = plain_nvfp4_cache(ours)
    held_out = windows[2:]
    kl_ours = evaluate(model, held_out, model, progress=False, kv=ours).kl_divergence
    kl_plain = evaluate(model, held_out, model, progress=False, kv=plain).kl_divergence
    assert 0 < kl_ours < 0.8 * kl_plain, (kl_ours, kl_plain)
