"""Level 2: every Triton kernel gives the torch reference's bits (quantize and dequantize, odd shapes, all float
dtypes); the fused dequantize-GEMMs agree with the reference GEMM within a tolerance."""

from __future__ import annotations

import pytest
import torch

from optiserve.kernels import FP8Tensor, Int4Tensor, Int8Tensor, NVFP4Tensor, int4_linear, nvfp4_linear
from optiserve.kernels.gemm import linear_reference
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv
from tests.kernels.utils import assert_bits_equal, wide_range

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16],
                                 ids=["fp32", "bf16", "fp16"])
SHAPES = [(37,), (3, 37), (2, 5, 48), (1, 16), (8, 130), (4, 576)]
OUT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


QTensor = NVFP4Tensor | FP8Tensor | Int8Tensor | Int4Tensor


def _assert_same(a: QTensor, b: QTensor, fields: tuple[str, ...]) -> None:
    for f in fields:
        assert_bits_equal(getattr(a, f), getattr(b, f))


def _check_dequantize(a: QTensor, b: QTensor) -> None:
    """Kernel dequantize of `a` == reference dequantize of `b`, for every output dtype."""
    for out in OUT_DTYPES:
        assert_bits_equal(a.dequantize(out, use_kernel=True), b.dequantize(out, use_kernel=False))


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nvfp4_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = wide_range(shape, seed=len(shape) * 100 + shape[-1], dtype=dtype)
    for s2 in (None, float(x.abs().amax()) / 2688.0 / 8):  # weight path; activation path with a small calibration
        a = NVFP4Tensor.from_float(x, s2, use_kernel=True)
        b = NVFP4Tensor.from_float(x, s2, use_kernel=False)
        _assert_same(a, b, ("qdata", "scale", "per_tensor_scale"))
        _check_dequantize(a, b)


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_nvfp4_kv_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The KV encoder's searched block scales; its decode is NVFP4Tensor's (checked above)."""
    x = wide_range(shape, seed=len(shape) * 10 + shape[-1], dtype=dtype)
    for s2 in (float(x.abs().amax()) / 2688.0, float(x.abs().amax()) / 2688.0 / 8):  # in range; saturating
        a = quantize_nvfp4_kv(x, s2, use_kernel=True)
        b = quantize_nvfp4_kv(x, s2, use_kernel=False)
        _assert_same(a, b, ("qdata", "scale", "per_tensor_scale"))


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    x = wide_range(shape, seed=shape[-1], dtype=dtype)
    for scale in (None, float(x.abs().amax()) / 448.0 / 4):  # per-tensor amax; a calibrated scale that saturates
        a = FP8Tensor.from_float(x, scale, use_kernel=True)
        b = FP8Tensor.from_float(x, scale, use_kernel=False)
        _assert_same(a, b, ("qdata", "scale"))
        _check_dequantize(a, b)


@DTYPES
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_tensor"])
def test_int8_kernel_matches_reference(shape: tuple[int, ...], dtype: torch.dtype, per_channel: bool) -> None:
    x = wide_range(shape, seed=shape[-1] + 7, dtype=dtype)
    a = Int8Tensor.from_float(x, per_channel, use_kernel=True)
    b = Int8Tensor.from_float(x, per_channel, use_kernel=False)
    _assert_same(a, b, ("qdata", "scale"))
    _check_dequantize(a, b)
    if not per_channel:  # static activation scale: clamps at -128 / 127
        scale = float(x.abs().amax()) / 127.0 / 3
        a = Int8Tensor.from_float(x, False, scale, use_kernel=True)
        b = Int8Tensor.from_float(x, False, scale, use_kernel=False)
        _assert_same(a, b, ("qdata", "scale"))


@DTYPES
@pytest.mark.parametrize("shape", [(2, 16), (6, 130), (8, 576), (4, 256)], ids=str)
def test_int4_kernel_matches_reference(shape: tuple[int, int], dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(shape[1])
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    a = Int4Tensor.from_float(w, use_kernel=True)
    b = Int4Tensor.from_float(w, use_kernel=False)
    _assert_same(a, b, ("qdata", "scale"))
    _check_dequantize(a, b)
    clipped = b.scale * 0.6  # AWQ-style clipped scales: codes clamp at -8 / 7
    _assert_same(Int4Tensor.from_float(w, clipped, use_kernel=True), Int4Tensor.from_float(w, clipped), ("qdata",))


@DTYPES
@pytest.mark.parametrize("mnk", [(1, 48, 576), (5, 34, 130), (17, 64, 100), (3, 2, 16)], ids=str)
def test_fused_dequant_gemm_within_tolerance(mnk: tuple[int, int, int], dtype: torch.dtype) -> None:
    m, n, k = mnk
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g) * 0.05
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for qw, fn in ((NVFP4Tensor.from_float(w), nvfp4_linear), (Int4Tensor.from_float(w), int4_linear)):
        y = fn(x, qw, use_kernel=True)
        ref = linear_reference(x, qw)
        assert y.dtype == dtype and y.shape == (m, n)
        scale = ref.float().abs().max().item()
        torch.testing.assert_close(y.float(), ref.float(), rtol=tol, atol=tol * scale)


def test_fused_gemm_leading_dims_and_reference_fallback() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 32, generator=g)
    qw = NVFP4Tensor.from_float(torch.randn(4, 32, generator=g))
    y = nvfp4_linear(x, qw, use_kernel=True)
    assert y.shape == (2, 3, 4)
    torch.testing.assert_close(y, nvfp4_linear(x, qw), rtol=1e-5, atol=1e-5)  # CPU default: torch reference
    torch.testing.assert_close(y, x @ qw.dequantize().T, rtol=1e-5, atol=1e-5)


def test_wrapper_checks() -> None:
    x = torch.randn(4, 32)
    with pytest.raises(AssertionError):
        NVFP4Tensor.from_float(x.T)  # not contiguous
    with pytest.raises(AssertionError):
        FP8Tensor.from_float(x.to(torch.int32))
    with pytest.raises(AssertionError):
        nvfp4_linear(torch.randn(2, 16), NVFP4Tensor.from_float(x))  # K mismatch


def test_fp8_kernel_on_every_rounding_boundary() -> None:
    """All E4M3 values, the midpoints between neighbours (the ties) and one fp32 ulp either side, plus random fp32
    bit patterns: the kernel's hand-written E4M3 rounding equals torch's cast everywhere."""
    grid = torch.arange(0, 0x7F, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    near = torch.cat([grid, mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1)])
    g = torch.Generator().manual_seed(0)
    rand = torch.randint(-(2**31), 2**31 - 1, (1 << 14,), generator=g, dtype=torch.int64).to(torch.int32)
    rand = rand.view(torch.float32)
    x = torch.cat([near, -near, rand[torch.isfinite(rand)], torch.tensor([500.0, -1e30, 464.0, 2.0**-10])])
    assert_bits_equal(FP8Tensor.from_float(x, 1.0, use_kernel=True).qdata, FP8Tensor.from_float(x, 1.0).qdata)
