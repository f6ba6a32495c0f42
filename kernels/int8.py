"""INT8, symmetric: per-channel (one scale per row = output channel) for weights, per-tensor for activations.

Follows ModelOpt (`INT8QTensor.quantize` / `.dequantize` in modelopt/torch/quantization/qtensor/int8_tensor.py; the
INT8_SQ / INT8_WO branches of `to_quantized_weight`, `from_quantized_weight` and `get_scaling_factor_from_weight`
in modelopt/torch/export/quant_utils.py):
  scale   = amax.float() / 127 (per row: amax over the last dim; per tensor: over everything); 0 -> 1.0
  qdata   = (x / scale).round().clamp(-128, 127).to(int8)   (round half to even; full int8 range, not [-127, 127])
            per row the scale is [..., 1] so the quotient is fp32; per tensor it is a 0-dim fp32, so for bf16/fp16
            inputs the quotient is first rounded to the input dtype (torch promotion), exactly as in ModelOpt
  dequant = qdata.to(dtype) * scale.to(dtype)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .common import (
    MODE_FP32,
    check_float_input,
    clamp_keep_nan,
    divide_exactly,
    elementwise_grid,
    round_half_even,
    round_to_mode,
    rounding_mode,
    use_triton,
)
from .formats import INT8_MAX, INT8_MAXBOUND, INT8_MIN, ZERO_AMAX_SCALE

BLOCK = 1024  # elements per Triton program


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax (any shape) -> fp32 scale amax / 127, with 1.0 where amax is 0."""
    scale = divide_exactly(amax.float(), INT8_MAXBOUND)
    return torch.where(scale == 0, torch.full_like(scale, ZERO_AMAX_SCALE), scale)


def _scale_view(scale: torch.Tensor) -> torch.Tensor:
    """Per-row scales [...] broadcast against x [..., K] as [..., 1]; a per-tensor 0-dim scale stays 0-dim."""
    return scale if scale.dim() == 0 else scale.unsqueeze(-1)


# ---------------------------------------------------------------------------------------------- torch reference ---
def quantize_int8_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] with scale [] (per tensor) or [...] (per row) -> int8 [..., K].

    The quotient is an fp32 division; with a 0-dim scale it is rounded to x's dtype, which is what `x / scale` does on
    CPU (spelled out so that the result does not depend on the device, see `fp8.quantize_fp8_reference`).
    """
    q = x.float() / _scale_view(scale)
    if scale.dim() == 0:
        q = q.to(x.dtype)
    return q.round().clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def dequantize_int8_reference(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [..., K] and its scale -> `dtype` (the multiply happens in `dtype`, as in ModelOpt)."""
    return qdata.to(dtype) * _scale_view(scale).to(dtype)


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def _int8_quantize_kernel(x_ptr, q_ptr, scale_ptr, n, K, BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
                          Q_MODE: tl.constexpr):
    # x: [n] float (rows of K); q: [n] int8; scale: [n // K] if PER_ROW else []
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if PER_ROW:  # noqa: SIM108 (a compile-time branch; kept as a plain `if` for Triton's code generator)
        scale = tl.load(scale_ptr + offs // K, mask=mask, other=1.0)
    else:
        scale = tl.load(scale_ptr)
    q = round_to_mode(tl.math.div_rn(x, scale), Q_MODE)
    # clamping before rounding gives the same integer (the bounds are integers) and keeps |q| small
    q = round_half_even(clamp_keep_nan(q, -128.0, 127.0))
    tl.store(q_ptr + offs, q.to(tl.int8), mask=mask)


@triton.jit
def _int8_dequantize_kernel(q_ptr, scale_ptr, y_ptr, n, K, BLOCK: tl.constexpr, PER_ROW: tl.constexpr,
                            OUT_MODE: tl.constexpr):
    # q: [n] int8; y: [n] in the output dtype
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    if PER_ROW:  # noqa: SIM108 (a compile-time branch; kept as a plain `if` for Triton's code generator)
        scale = tl.load(scale_ptr + offs // K, mask=mask, other=1.0)
    else:
        scale = tl.load(scale_ptr)
    y = round_to_mode(q * round_to_mode(scale, OUT_MODE), OUT_MODE)  # exact product, one rounding
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- wrappers ---
@dataclass
class Int8Tensor:
    """An INT8 tensor: qdata int8 (same shape as the original), scale float32 [] (per tensor) or [...] (per row)."""

    qdata: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the original (and of the dequantized) tensor."""
        return tuple(self.qdata.shape)

    @classmethod
    def from_float(cls, x: torch.Tensor, per_channel: bool = True, scale: torch.Tensor | float | None = None, *,
                   use_kernel: bool | None = None) -> Int8Tensor:
        """Quantize `x` [..., K]: per row (weights, default) or per tensor (activations; pass the calibrated scale
        for static quantization). `scale` defaults to amax / 127."""
        check_float_input(x)
        if scale is None:
            amax = x.abs().amax(dim=-1) if per_channel else x.abs().amax()
            scale = int8_scale(amax)
        scale = torch.as_tensor(scale, dtype=torch.float32, device=x.device)
        expected = x.shape[:-1] if per_channel else torch.Size([])
        assert scale.shape == expected, f"scale shape {tuple(scale.shape)} != {tuple(expected)}"
        if not use_triton(x, use_kernel, _int8_quantize_kernel):
            return cls(quantize_int8_reference(x, scale), scale, x.dtype)
        qdata = torch.empty(x.shape, dtype=torch.int8, device=x.device)
        n = x.numel()
        per_row = scale.dim() > 0  # a 0-dim scale (also per-row of a 1-D x) rounds the quotient to x's dtype
        q_mode = MODE_FP32 if per_row else rounding_mode(x.dtype)
        _int8_quantize_kernel[elementwise_grid(n, BLOCK)](x, qdata, scale.contiguous(), n, x.shape[-1], BLOCK=BLOCK,
                                                          PER_ROW=per_row, Q_MODE=q_mode)
        return cls(qdata, scale, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        """Back to a float tensor in `dtype` (default: the original dtype)."""
        dtype = dtype or self.dtype
        per_row = self.scale.dim() > 0
        assert self.qdata.dtype == torch.int8 and self.qdata.is_contiguous()
        assert self.scale.dtype == torch.float32 and (not per_row or self.scale.shape == self.qdata.shape[:-1])
        if not use_triton(self.qdata, use_kernel, _int8_dequantize_kernel):
            return dequantize_int8_reference(self.qdata, self.scale, dtype)
        y = torch.empty(self.qdata.shape, dtype=dtype, device=self.qdata.device)
        n = y.numel()
        _int8_dequantize_kernel[elementwise_grid(n, BLOCK)](self.qdata, self.scale.contiguous(), y, n,
                                                            self.qdata.shape[-1], BLOCK=BLOCK, PER_ROW=per_row,
                                                            OUT_MODE=rounding_mode(dtype))
        return y


@dataclass
class Int8GroupTensor:
    """INT8 activations quantized per row and group of `group` along K at run time (the W4A8 format's input, as
    llama.cpp's q8 blocks): qdata int8 [..., G, group] (the last group zero-padded), scale fp32 [..., G] =
    amax_group / 127 (0 -> 1.0). An `Int8Tensor` quantized per row over the groups, reshaped."""

    qdata: torch.Tensor
    scale: torch.Tensor
    k: int
    dtype: torch.dtype

    @classmethod
    def from_float(cls, x: torch.Tensor, group: int, *, use_kernel: bool | None = None) -> Int8GroupTensor:
        k = x.shape[-1]
        groups = torch.nn.functional.pad(x, (0, -k % group)).reshape(*x.shape[:-1], -1, group)
        q = Int8Tensor.from_float(groups, per_channel=True, use_kernel=use_kernel)
        return cls(q.qdata, q.scale, k, x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        y = Int8Tensor(self.qdata, self.scale, self.dtype).dequantize(dtype, use_kernel=use_kernel)
        return y.flatten(-2)[..., : self.k]
