"""FP8 E4M3 with one FP32 per-tensor scale.

Follows ModelOpt (`FP8QTensor.quantize` / `.dequantize` in modelopt/torch/quantization/qtensor/fp8_tensor.py and the
FP8 branch of `to_quantized_weight` / `from_quantized_weight` in modelopt/torch/export/quant_utils.py):
  scale   = amax.float() / 448   (`get_scaling_factor`: amax / maxbound; a zero amax gives 1.0 here)
  qdata   = (x / scale).to(float8_e4m3fn), with the 0-dim fp32 scale, so for bf16/fp16 inputs the quotient is
            rounded to the input dtype first (torch promotion), then to E4M3 with round-to-nearest-even. This is
            torch's CPU arithmetic (fp32 divide, then round); torch on CUDA would cast the scale to bf16/fp16 first
  dequant = qdata.to(dtype) * scale.to(dtype)
We also clamp the quotient to [-448, 448] before the cast. With scale = amax / 448 the clamp never changes a value;
with a given (calibrated) scale it saturates where ModelOpt's plain cast would give NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    check_float_input,
    clamp_keep_nan,
    divide_exactly,
    e4m3_decode,
    e4m3_encode,
    elementwise_grid,
    round_to_mode,
    rounding_mode,
    scalar_scale,
    use_triton,
)
from .formats import FP8_E4M3_MAX, ZERO_AMAX_SCALE

BLOCK = 1024  # elements per Triton program


def fp8_per_tensor_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """FP32 per-tensor scale amax / 448 (1.0 for amax == 0)."""
    scale = divide_exactly(torch.as_tensor(amax).float().reshape(()), FP8_E4M3_MAX)
    return torch.where(scale == 0, torch.full_like(scale, ZERO_AMAX_SCALE), scale)


# ---------------------------------------------------------------------------------------------- torch reference ---
def quantize_fp8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (any shape) and a 0-dim fp32 scale -> float8_e4m3fn tensor of the same shape.

    `x / scale` is spelled out as torch computes it on CPU (fp32 division, result rounded to x's dtype) so that the
    reference gives the same bits on every device: on CUDA, torch would first cast the 0-dim scale to bf16/fp16.
    """
    q = (x.float() / scale).to(x.dtype)
    return q.clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8_reference(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float8_e4m3fn values and their 0-dim scale -> `dtype` (the multiply happens in `dtype`, as in ModelOpt)."""
    return qdata.to(dtype) * scale.to(dtype)


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def _fp8_quantize_kernel(x_ptr, q_ptr, scale_ptr, n, BLOCK: tl.constexpr, IN_MODE: tl.constexpr):
    # x: [n] float; q: [n] E4M3 bits (uint8)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    q = round_to_mode(tl.math.div_rn(x, tl.load(scale_ptr)), IN_MODE)  # torch rounds x / scale to x's dtype
    tl.store(q_ptr + offs, e4m3_encode(clamp_keep_nan(q, -448.0, 448.0)), mask=mask)


@triton.jit
def _fp8_dequantize_kernel(q_ptr, scale_ptr, y_ptr, n, BLOCK: tl.constexpr, OUT_MODE: tl.constexpr):
    # q: [n] E4M3 bits; y: [n] in the output dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = e4m3_decode(tl.load(q_ptr + offs, mask=mask, other=0))
    scale = round_to_mode(tl.load(scale_ptr), OUT_MODE)  # scale.to(dtype); the product is exact in fp32
    y = round_to_mode(q * scale, OUT_MODE)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- wrappers ---
@dataclass
class FP8Tensor:
    """An FP8 E4M3 tensor: qdata float8_e4m3fn (same shape as the original), scale float32 [] (per tensor)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the original (and of the dequantized) tensor."""
        return tuple(self.qdata.shape)

    @classmethod
    def from_float(cls, x: torch.Tensor, scale: torch.Tensor | float | None = None, *,
                   use_kernel: bool | None = None) -> FP8Tensor:
        """Quantize `x`; `scale` defaults to amax(x) / 448 (pass a calibrated one for static activations)."""
        check_float_input(x)
        scale = scalar_scale(fp8_per_tensor_scale(x.abs().amax()) if scale is None else scale, x.device)
        if not use_triton(x, use_kernel, _fp8_quantize_kernel):
            return cls(quantize_fp8_reference(x, scale), scale, x.dtype)
        qdata = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
        n = x.numel()
        _fp8_quantize_kernel[elementwise_grid(n, BLOCK)](x, qdata.view(torch.uint8), scale, n, BLOCK=BLOCK,
                                                         IN_MODE=rounding_mode(x.dtype))
        return cls(qdata, scale, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        """Back to a float tensor in `dtype` (default: the original dtype)."""
        dtype = dtype or self.dtype
        assert self.qdata.dtype == torch.float8_e4m3fn and self.qdata.is_contiguous()
        assert self.scale.dtype == torch.float32 and self.scale.dim() == 0, "FP8Tensor scale must be a 0-dim fp32"
        if not use_triton(self.qdata, use_kernel, _fp8_dequantize_kernel):
            return dequantize_fp8_reference(self.qdata, self.scale, dtype)
        y = torch.empty(self.qdata.shape, dtype=dtype, device=self.qdata.device)
        n = y.numel()
        _fp8_dequantize_kernel[elementwise_grid(n, BLOCK)](self.qdata.view(torch.uint8), self.scale, y, n,
                                                           BLOCK=BLOCK, OUT_MODE=rounding_mode(dtype))
        return y
