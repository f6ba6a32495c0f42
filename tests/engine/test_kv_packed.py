"""The packed FP8/NVFP4 KV cache on the CPU: the fused write kernel gives the reference's bits, attention over the
packed pools gives bit for bit what it gives over the decoded pools, and the cache holds the format's bytes."""

from __future__ import annotations

import pytest
import torch

from optiserve.engine import ops
from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.kv_quant import KVFormat, KVPages, kv_bytes_per_element, kv_scale_for
from optiserve.engine.runner import ModelRunner
from tests.kernels.utils import AVX2, needs_distinct_avx2_build

KERNELS = ops.load()
needs_kernels = pytest.mark.skipif(KERNELS is None, reason="the CPU kernels are not built here")
FORMATS = ["fp8", "nvfp4"]


def calibrated(fmt: str, k: torch.Tensor, v: torch.Tensor, layers: int = 1, **kw) -> KVFormat:
    """A KV format for K/V like `k`, `v` [..., KV, D]: scales from their amax, mean keys per head."""
    mean = k.reshape(-1, *k.shape[-2:]).mean(0)  # [KV, D]
    return KVFormat(fmt, [kv_scale_for(fmt, k.abs().amax())] * layers, [kv_scale_for(fmt, v.abs().amax())] * layers,
                    [mean] * layers, **kw)


def keys_like_a_model(gen: torch.Generator, *shape: int) -> torch.Tensor:
    """Keys with a few channels far larger than the rest (what the NVFP4 encoding centres and rotates away)."""
    D = shape[-1]
    return torch.randn(*shape, generator=gen) + 6 * torch.randn(D, generator=gen) * (torch.rand(D, generator=gen) < .1)


def kernel_write(mod, enc, x: torch.Tensor, rows: torch.Tensor, width: int, tokens: int):
    """Encode x [B, S, KV, D] with `mod`'s kernel into fresh pools of `tokens` rows; (codes, scales) of `rows`."""
    KV, D = x.shape[-2:]
    codes = torch.zeros(tokens, KV, width, dtype=torch.uint8)
    scales = torch.zeros(tokens, KV, D // 16, dtype=torch.uint8)
    empty = torch.empty(0)
    mod.kv_write(enc.format.kernel_code, x, rows, codes, scales, enc.scale_value,
                 empty if enc.mean is None else enc.mean, empty if enc.rotation is None else enc.rotation,
                 list(enc.factors))
    return codes[rows].view(*x.shape[:-1], width), scales[rows].view(*x.shape[:-1], D // 16)


def assert_write_matches_reference(mod, fmt: str, x: torch.Tensor, kv: KVFormat, keys: bool) -> None:
    """Kernel codes == `KVEncoding.encode`'s. NVFP4 keys are rotated in the kernel's summation order (MKL's matmul
    sums in another), so a rotated element may land on the other side of a rounding boundary: a handful of
    blocks then differ; everything else is bit-exact."""
    enc = kv.encoding(0, keys, x.shape[-1])
    B, S = x.shape[:2]
    rows = torch.randperm(3 * B * S, generator=torch.Generator().manual_seed(1))[: B * S]
    codes, scales = kernel_write(mod, enc, x, rows, x.shape[-1] // (2 if fmt == "nvfp4" else 1), 3 * B * S)
    want_codes, want_scales = enc.encode(x)
    if fmt == "fp8":
        assert torch.equal(codes, want_codes)
        return
    by_block = (*scales.shape, 8)  # a block's 16 codes are 8 bytes
    blocks_differ = (codes.view(by_block) != want_codes.view(by_block)).any(-1) | (scales != want_scales)
    allowed = 0 if enc.rotation is None else max(1, blocks_differ.numel() // 10000)  # 0 of 112k seen on the model
    assert int(blocks_differ.sum()) <= allowed, (int(blocks_differ.sum()), blocks_differ.numel())


def qkv_with(k: torch.Tensor, v: torch.Tensor, H: int, gen: torch.Generator) -> torch.Tensor:
    """A model's qkv [B, S, H + 2KV, D] with k, v as its key and value heads (k/v slices are not contiguous)."""
    B, S, KV, D = k.shape
    qkv = torch.randn(B, S, H + 2 * KV, D, generator=gen)
    qkv[:, :, H : H + KV], qkv[:, :, H + KV :] = k, v
    return qkv


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("KV", "D"), [(3, 64), (1, 128), (5, 32)])
def test_fused_write_gives_the_reference_bits(fmt, KV, D):
    gen = torch.Generator().manual_seed(KV * D)
    k, v = keys_like_a_model(gen, 3, 7, KV, D), torch.randn(3, 7, KV, D, generator=gen)
    qkv = qkv_with(k, v, 2 * KV, gen)
    x_k, x_v = qkv[:, :, 2 * KV : 3 * KV], qkv[:, :, 3 * KV :]
    for kv in (calibrated(fmt, k, v), calibrated(fmt, k, v, rotate_keys=False, search_scales=False)):
        assert_write_matches_reference(KERNELS, fmt, x_k, kv, keys=True)
        assert_write_matches_reference(KERNELS, fmt, x_v, kv, keys=False)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_write_on_the_models_own_keys_and_values(engine, chat_prompt_ids, fmt):
    """Every layer's K/V of a real prompt (computed with an unquantized cache), calibrated on themselves."""
    runner = engine.runner
    prompt = chat_prompt_ids[3]
    runner.prefill(0, prompt)
    k, v = runner.cache.read(0, len(prompt))  # [layers, S, KV, D]
    runner.cache.truncate(0, 0)
    for layer in range(k.shape[0]):
        kv = calibrated(fmt, k[layer], v[layer])
        assert_write_matches_reference(KERNELS, fmt, k[layer][None], kv, keys=True)
        assert_write_matches_reference(KERNELS, fmt, v[layer][None].contiguous(), kv, keys=False)


def packed_pools(fmt: str, gen: torch.Generator, N: int, bs: int, KV: int, D: int):
    """Random K/V pools [N, bs, KV, D] encoded in `fmt`: (the K and V `KVPages`, K and V decoded as stored)."""
    k, v = keys_like_a_model(gen, N, bs, KV, D), torch.randn(N, bs, KV, D, generator=gen)
    kv = calibrated(fmt, k, v)
    pages, stored = [], []
    for keys, t in ((True, k), (False, v)):
        enc = kv.encoding(0, keys, D)
        codes, scales = enc.encode(t)
        pages.append(KVPages(codes, scales, enc))
        stored.append(enc.format.decode(codes, scales, enc.scale).contiguous())  # keys stay rotated
    return pages, stored


def assert_packed_attention_is_the_decoded_one(mod, fmt: str, KV: int, D: int, tree: bool) -> None:
    """The packed kernel == the fp32 kernel over the decoded pools (query rotated alike for NVFP4 keys): bit for
    bit, for decode/verify rows (with and without a window) and draft-tree rows."""
    gen = torch.Generator().manual_seed(7 * KV + D)
    B, S, H, bs, N = 2, 5, 3 * KV, 8, 12
    (kp, vp), (k_stored, v_stored) = packed_pools(fmt, gen, N, bs, KV, D)
    table = torch.tensor([[3, 1, 7, 9], [0, 11, 5, 2]])
    pos = torch.tensor([[5, 6, 7, 8, 9], [25, 26, 27, 28, 29]])
    qkv = torch.randn(B, S, H + 2 * KV, D, generator=gen)
    q = qkv if kp.encoding.rotation is None else (qkv[:, :, :H] @ kp.encoding.rotation).contiguous()
    empty = torch.empty(0, dtype=torch.long)
    runs = [(pos, 0, empty, empty), (pos, 3, empty, empty)]
    if tree:  # rows at slots base + j over the prefix and their ancestors
        anc = torch.tril(torch.ones(S, S, dtype=torch.bool)).clone()
        anc[3, 1] = anc[4, 2] = False
        runs.append((pos, 0, torch.tensor([10, 20]), anc.expand(B, S, S).contiguous()))
    for p, window, base, ancestors in runs:
        got = mod.decode_attention_packed(q, kp.codes, _or(kp.scales), vp.codes, _or(vp.scales),
                                          kp.encoding.format.kernel_code, kp.encoding.scale_value,
                                          vp.encoding.scale_value, table, p, H, window, base, ancestors)
        want = mod.decode_attention(q, k_stored, v_stored, table, p, H, window, base, ancestors)
        assert torch.equal(got, want)


def _or(t: torch.Tensor | None) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8) if t is None else t


@needs_kernels
@pytest.mark.parametrize(("fmt", "KV", "D"), [(f, kv, d) for f in FORMATS for kv, d in ((3, 64), (1, 128), (5, 32))]
                         + [("fp8", 2, 24)])  # a head_dim of no whole vectors: the scalar tails
def test_attention_over_packed_pools_is_attention_over_their_decoded_values(fmt, KV, D):
    assert_packed_attention_is_the_decoded_one(KERNELS, fmt, KV, D, tree=True)


@needs_kernels
@pytest.mark.parametrize("fmt", FORMATS)
def test_ops_rotates_the_query_and_scores_match_the_keys_own_basis(fmt):
    """Through ops.decode_attention: the same as SDPA-style attention over the keys decoded back to their own basis
    (dropping q.m and rotating move scores by rounding only)."""
    gen = torch.Generator().manual_seed(3)
    KV, D, H, B, S = 3, 64, 9, 2, 4
    (kp, vp), _ = packed_pools(fmt, gen, 12, 8, KV, D)
    table, pos = torch.tensor([[3, 1, 7], [0, 11, 5]]), torch.tensor([[5, 6, 7, 8], [17, 18, 19, 20]])
    qkv = torch.randn(B, S, H + 2 * KV, D, generator=gen)
    got = ops.decode_attention(qkv, kp, vp, table, pos, H, 0)
    k_own = kp.encoding.decode(kp.codes, kp.scales).contiguous()
    v_own = vp.encoding.decode(vp.codes, vp.scales).contiguous()
    torch.testing.assert_close(got, ops.decode_attention(qkv, k_own, v_own, table, pos, H, 0), rtol=1e-4, atol=1e-5)


@needs_distinct_avx2_build
def test_the_avx2_build_writes_and_reads_packed_kv_too():
    avx2 = ops.build(AVX2)
    gen = torch.Generator().manual_seed(5)
    for fmt in FORMATS:
        k, v = keys_like_a_model(gen, 2, 9, 3, 64), torch.randn(2, 9, 3, 64, generator=gen)
        kv = calibrated(fmt, k, v)
        assert_write_matches_reference(avx2, fmt, k, kv, keys=True)
        assert_write_matches_reference(avx2, fmt, v, kv, keys=False)
        assert_packed_attention_is_the_decoded_one(avx2, fmt, 3, 64, tree=True)


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_cache_holds_the_formats_bytes_and_reads_back_decoded(fmt):
    """Pools of the format's bytes per token; `read`/`window` give the decoded values (keys in their own basis),
    what `KVFormat.store_keys` says the cache holds; `keep_path` moves codes and scales."""
    gen = torch.Generator().manual_seed(11)
    shape = CacheShape(num_layers=2, num_slots=2, num_kv_heads=3, max_len=16, head_dim=64, block_size=4)
    cache = KVCache(shape, torch.float32)
    fp32_bytes = cache.nbytes
    k, v = keys_like_a_model(gen, 1, 10, 3, 64), torch.randn(1, 10, 3, 64, generator=gen)
    kv = calibrated(fmt, k, v, layers=2)
    cache.set_format(kv)
    per_element = kv.format.bytes_per_element
    assert cache.nbytes == fp32_bytes * per_element / 4
    assert cache.bytes_per_token == cache.packed_bytes_per_token() == shape.elements_per_token * per_element
    cache.begin(1, [10])
    for layer in range(2):
        cache.update(layer, torch.arange(10)[None], k, v)
    keys, values = cache.read(1, 10)  # [layers, S, KV, D]
    assert torch.equal(keys[1], kv.store_keys(1, k)[0]) and torch.equal(values[0], kv.store_values(0, v)[0])
    window_k, _ = cache.window(0)  # [B, KV, L, D]
    assert torch.equal(window_k[0].transpose(0, 1), keys[0])
    cache.keep_path(1, 4, [0, 2, 5], 10)  # rows 4, 6, 9 -> 4, 5, 6
    kept_k, kept_v = cache.read(1, 7)
    assert torch.equal(kept_k[:, 4:], keys[:, [4, 6, 9]]) and torch.equal(kept_v[:, :4], values[:, :4])


@pytest.mark.parametrize("fmt", FORMATS)
def test_kv_cache_memory_holds_more_blocks_in_a_packed_format(engine, fmt):
    """`--kv-cache-memory` counts bytes in the KV format served from start-up: the same bytes hold 4 / (bytes per
    element) times the fp32 blocks, and the pools in that format fit the budget."""
    model, memory = engine.runner.model, 8 * 2**20
    runners = {f: ModelRunner(model, 2, 256, torch.float32, 16, memory, kv_format=f) for f in ("none", fmt)}
    blocks = {f: r.cache.shape.num_blocks for f, r in runners.items()}
    assert abs(blocks[fmt] * kv_bytes_per_element(fmt, torch.float32) / 4 - blocks["none"]) <= 1
    cfg, gen = model.cfg, torch.Generator().manual_seed(5)
    k = keys_like_a_model(gen, 1, 8, cfg.num_kv_heads, cfg.head_dim)
    cache = runners[fmt].cache
    cache.set_format(calibrated(fmt, k, torch.randn(k.shape, generator=gen), layers=cfg.num_layers))
    block_bytes = cache.bytes_per_token * cache.shape.block_size
    assert memory - block_bytes < cache.nbytes <= memory
