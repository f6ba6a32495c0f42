"""On a CUDA GPU (skipped where torch sees none, as in CI): the compiled Triton kernels give the torch reference's
bits, the packed GPU linears (`torch._scaled_mm`, `torch._int_mm`, Triton dequantize-GEMMs) give the numbers of the
CPU's compute copy, and the engine generates on `--device cuda` from packed weights.

Run on a GPU machine with Triton compiling, not interpreting (deploy/gpu_check.sh does this):
`TRITON_INTERPRET=0 OPTISERVE_GPU_MODEL=<model> pytest tests/gpu` (`default` unless set)."""

from __future__ import annotations

import dataclasses
import os
import time

import pytest
import torch

from optiserve.engine.chat import CHAT_INSTRUCTIONS, chat_prompt_ids
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, run_to_completion
from optiserve.engine.quant import QuantLinear, quantize_weight, weight_bytes
from optiserve.engine.quantized_checkpoint import load_quantized_layers, packed_to_device
from optiserve.engine.runner import ModelRunner
from optiserve.kernels import FP8Tensor, Int4Tensor, Int8Tensor, NVFP4Tensor, int4_linear, nvfp4_linear
from optiserve.kernels.gemm import linear_reference
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv
from optiserve.optimize.ptq_pipeline import QuantRequest, cache_key, prepare_quantized, ptq_cache_dir
from tests.kernels.test_kernel_vs_reference import DTYPES
from tests.kernels.test_packed_compute import ACTIVATION_DIVISOR, FORMATS
from tests.kernels.utils import assert_bits_equal, wide_range

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here; CI has none)")

CUDA = "cuda"
WEIGHT_ONLY = {"nvfp4-w4a16", "int4"}  # no activation code can flip between summation orders
MODEL = os.environ.get("OPTISERVE_GPU_MODEL", "default")


def assert_same_bits(gpu, cpu) -> None:
    for f in dataclasses.fields(cpu):
        if isinstance(getattr(cpu, f.name), torch.Tensor):
            assert_bits_equal(getattr(gpu, f.name).cpu(), getattr(cpu, f.name))


QUANTIZERS = {
    "nvfp4": lambda x, k: NVFP4Tensor.from_float(x, use_kernel=k),
    "nvfp4-activation": lambda x, k: NVFP4Tensor.from_float(x, float(x.abs().amax()) / 2688.0 / 8, use_kernel=k),
    "fp8": lambda x, k: FP8Tensor.from_float(x, use_kernel=k),
    "int8": lambda x, k: Int8Tensor.from_float(x, True, use_kernel=k),
    "int8-static": lambda x, k: Int8Tensor.from_float(x, False, float(x.abs().amax()) / 127.0 / 3, use_kernel=k),
    "int4": lambda x, k: Int4Tensor.from_float(x, use_kernel=k),
}


SHAPES = pytest.mark.parametrize("shape", [(8, 576), (6, 130), (4, 1536)], ids=str)


@DTYPES
@SHAPES
@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_compiled_quantizers_give_the_reference_bits(name, shape, dtype):
    """Each Triton quantizer compiled for the GPU == the torch reference on the GPU == the torch reference on the
    CPU, bit for bit (scales included: one on-disk format whichever device quantized), and so does each dequantize
    kernel for every output dtype."""
    x = wide_range(shape, seed=shape[-1], dtype=dtype) * (0.05 if name == "int4" else 1.0)
    kernel, gpu_ref, cpu = (QUANTIZERS[name](x.to(CUDA), True), QUANTIZERS[name](x.to(CUDA), False),
                            QUANTIZERS[name](x, False))
    assert_same_bits(gpu_ref, cpu)
    assert_same_bits(kernel, cpu)
    for out in (torch.float32, torch.bfloat16, torch.float16):
        assert_bits_equal(kernel.dequantize(out, use_kernel=True).cpu(), cpu.dequantize(out, use_kernel=False))


def block_errors(x: torch.Tensor, q) -> torch.Tensor:
    """Squared error of each 16-value block of x [R, K] (K a multiple of 16) after quantize-dequantize."""
    return ((q.dequantize(torch.float32).cpu() - x.float()) ** 2).reshape(x.shape[0], -1, 16).sum(-1)


@DTYPES
@pytest.mark.parametrize("shape", [(8, 576), (6, 128), (4, 1536)], ids=str)
def test_compiled_kv_encoder_finds_the_references_best_scales(shape, dtype):
    """The NVFP4 KV encoder searches each block's scale for the least squared error. Compiled, its error sums are
    FMA-contracted, so where two candidates' errors tie to within rounding it may keep the other one: every block's
    error must equal the reference's best (to 1e-6), and almost every code must be the reference's (on an H200:
    up to 1.6% of the bytes of a small tensor)."""
    x = wide_range(shape, seed=shape[-1], dtype=dtype)
    s2 = float(x.abs().amax()) / 2688.0
    kernel, cpu = quantize_nvfp4_kv(x.to(CUDA), s2, use_kernel=True), quantize_nvfp4_kv(x, s2, use_kernel=False)
    e_kernel, e_ref = block_errors(x, kernel), block_errors(x, cpu)
    torch.testing.assert_close(e_kernel, e_ref, rtol=1e-6, atol=0)
    assert (kernel.qdata.cpu() != cpu.qdata).float().mean() < 0.05


@DTYPES
@pytest.mark.parametrize("mnk", [(1, 48, 576), (5, 34, 130), (17, 1536, 576), (33, 576, 1536)], ids=str)
def test_compiled_dequant_gemms_match_the_reference(mnk, dtype):
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * n + k)
    x, w = torch.randn(m, k, generator=g).to(dtype), torch.randn(n, k, generator=g) * 0.05
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for qw, fn in ((NVFP4Tensor.from_float(w), nvfp4_linear), (Int4Tensor.from_float(w), int4_linear)):
        y = fn(x.to(CUDA), packed_to_device(qw, CUDA), use_kernel=True).cpu()
        ref = linear_reference(x.float(), qw)
        assert y.dtype == dtype and y.shape == (m, n)
        torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_gpu_linear_matches_the_cpu_compute_copy(fmt):
    """A fused two-shard layer with bias and pre_quant_scale: computed on the GPU from the packed tensors (no
    dequantized copy held) == the CPU's compute copy of the same packed tensors."""
    g = torch.Generator().manual_seed(0)
    w_q, w_k = torch.randn(64, 576, generator=g), torch.randn(32, 576, generator=g)
    x = torch.randn(3, 7, 576, generator=g)  # [B, S, K]: 21 rows
    input_scale = torch.tensor(x.abs().max().item() / ACTIVATION_DIVISOR.get(fmt, 1.0))
    bias, pre = torch.randn(96, generator=g), torch.rand(576, generator=g) + 0.5
    shards = [quantize_weight(fmt, w_q), quantize_weight(fmt, w_k)]
    copy = QuantLinear(fmt, shards, bias, input_scale, pre, torch.float32, compute="copy")
    on_gpu = [packed_to_device(s, CUDA) for s in shards]
    packed = QuantLinear(fmt, on_gpu, bias.to(CUDA), input_scale.to(CUDA), pre.to(CUDA), torch.float32)
    assert packed.compute == "packed" and not hasattr(packed, "weight_t")
    y, y_ref = packed(x.to(CUDA)).cpu(), copy(x)
    # FP8 tensor cores accumulate with less than fp32's precision (Hopper): ~2.5e-4 of the range seen
    tol = 1e-3 if fmt == "fp8" else 1e-4
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=tol * y_ref.abs().max().item())
    assert packed.resident_bytes() == packed.packed_bytes() < copy.resident_bytes()


@pytest.fixture(scope="module")
def engines() -> tuple[LLMEngine, LLMEngine]:
    cfg = {"model": MODEL, "max_batch": 4, "max_model_len": 512}
    return LLMEngine(EngineConfig(**cfg)), LLMEngine(EngineConfig(**cfg, device="cuda"))


def prompt_logits(model, ids: list[int]) -> torch.Tensor:
    return ModelRunner(model, 1, len(ids), torch.float32).prefill(0, ids, all_logits=True).float().cpu()  # [S, V]


@pytest.mark.parametrize("fmt", ["none", *sorted(WEIGHT_ONLY)])
def test_gpu_model_gives_the_cpu_logits(engines, fmt):
    """PTQ on the GPU (every linear packed there) against the checkpoint it wrote, read onto the CPU (the compute
    copy), on a chat prompt: the same logits to 1e-4 of their range. Formats that quantize activations are checked
    per layer above, not here: a last-bit difference flips an activation's code somewhere in 30 layers, and on a
    random-weight model that grows (H200: logits 6-45% of their norm apart after the first positions)."""
    cpu, gpu = engines
    ids = chat_prompt_ids(cpu.tokenizer, CHAT_INSTRUCTIONS)[0]
    req = QuantRequest(fmt, calib_samples=4, calib_seq_len=64)
    q_gpu = prepare_quantized(gpu.model_dir, gpu.master, gpu.tokenizer, req).model  # calibrated on the GPU
    q_cpu = cpu.master
    if fmt != "none":  # the export PTQ cached, in our one on-disk format
        q_cpu = load_quantized_layers(ptq_cache_dir() / cache_key(gpu.model_dir, gpu.master, req), cpu.master).model
        fmt_bytes, resident = weight_bytes(q_gpu)
        assert resident == fmt_bytes  # packed only, no float copy on the GPU
    got, ref = prompt_logits(q_gpu, ids), prompt_logits(q_cpu, ids)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4 * ref.abs().max().item())


def test_gpu_engine_generates_what_the_cpu_engine_does(engines):
    """Greedy decoding of four chat prompts, batched: the GPU engine's tokens == the CPU engine's (fp32). Prints the
    GPU's batch-1 decode speed."""
    cpu, gpu = engines
    prompts = chat_prompt_ids(cpu.tokenizer, CHAT_INSTRUCTIONS)[:4]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert run_to_completion(gpu, prompts, params) == run_to_completion(cpu, prompts, params)
    run_to_completion(gpu, prompts[:1], params)  # warm
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = len(run_to_completion(gpu, prompts[:1], params)[0])
    torch.cuda.synchronize()
    print(f"\nGPU engine fp32, batch 1: {n / (time.perf_counter() - t):.1f} tok/s (prefill included)")
