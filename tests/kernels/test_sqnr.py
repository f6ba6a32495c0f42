"""Level 3: quantize -> dequantize round trips on Gaussian data keep a minimum SQNR per format.

Measured on N(0, 1) [256, 576] (seeds 0-2, fp32; bf16 inputs within 0.5 dB): fp8 31.5 dB, int8 per-channel 42.4 dB,
int8 per-tensor 39.7 dB, nvfp4 20.4 dB, nvfp4 with the KV cache's searched block scales 21.7 dB, int4 (group 128)
18.7 dB. The floors sit ~1 dB below.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from optiserve.kernels import (
    FP8Tensor,
    Int4Tensor,
    Int8Tensor,
    NVFP4Tensor,
    int4_linear,
    nvfp4_linear,
    nvfp4_per_tensor_scale,
)
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv
from tests.kernels.utils import sqnr_db

FLOORS_DB = {"fp8": 30.5, "int8_per_channel": 41.0, "int8_per_tensor": 38.5, "nvfp4": 19.5, "nvfp4_kv": 20.8,
             "int4": 17.5}
QUANTIZERS = {
    "fp8": lambda x, k: FP8Tensor.from_float(x, use_kernel=k),
    "int8_per_channel": lambda x, k: Int8Tensor.from_float(x, use_kernel=k),
    "int8_per_tensor": lambda x, k: Int8Tensor.from_float(x, per_channel=False, use_kernel=k),
    "nvfp4": lambda x, k: NVFP4Tensor.from_float(x, use_kernel=k),
    "nvfp4_kv": lambda x, k: quantize_nvfp4_kv(x, nvfp4_per_tensor_scale(x.abs().amax()), use_kernel=k),
    "int4": lambda x, k: Int4Tensor.from_float(x, use_kernel=k),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fmt", list(FLOORS_DB))
def test_round_trip_sqnr_floor(fmt: str, dtype: torch.dtype) -> None:
    x = torch.randn(256, 576, generator=torch.Generator().manual_seed(0)).to(dtype)
    y = QUANTIZERS[fmt](x, False).dequantize()
    assert y.dtype == dtype and y.shape == x.shape
    assert sqnr_db(x, y) > FLOORS_DB[fmt]


@pytest.mark.parametrize("fmt", list(FLOORS_DB))
def test_round_trip_sqnr_floor_triton(fmt: str) -> None:
    x = torch.randn(32, 576, generator=torch.Generator().manual_seed(1))
    assert sqnr_db(x, QUANTIZERS[fmt](x, True).dequantize(use_kernel=True)) > FLOORS_DB[fmt] - 0.5


@pytest.mark.parametrize("fmt, linear", [("nvfp4", nvfp4_linear), ("int4", int4_linear)])
def test_fused_gemm_output_sqnr(fmt: str, linear: Callable[..., torch.Tensor]) -> None:
    """The quantized GEMM output keeps at least the weight round trip's SQNR (errors average over K)."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 576, generator=g), torch.randn(64, 576, generator=g)
    y = linear(x, QUANTIZERS[fmt](w, False), use_kernel=True)
    assert sqnr_db(x @ w.T, y) > FLOORS_DB[fmt] - 0.5
