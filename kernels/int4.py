"""INT4 weights, AWQ export style: symmetric, one FP32 scale per group of 128 along the input dim.

Follows ModelOpt's INT4_AWQ export (modelopt/torch/export/quant_utils.py: `get_scaling_factor` /
`get_scaling_factor_from_weight` for the scale, `pack_int4_in_uint8` for the codes and the packing):
  scale = amax_group.float() / 7   (0 -> 1.0, as in `get_scaling_factor_from_weight`)
  code  = (w / scale[:, k // 128]).round().clamp(-8, 7)   (fp32 quotient, round half to even)
  pack  = two's-complement nibbles of two neighbouring OUTPUT rows in one byte:
          qdata[i, k] = (code[2i, k] & 0xF) | (code[2i + 1, k] & 0xF) << 4   -> qdata is [N/2, K], N must be even
          (this is `pack_int4_in_uint8`'s 2-D order; it is not the K-packed, offset-by-8 `INT4QTensor` layout)
  dequant = code * scale in fp32, then cast (ModelOpt has no export-side dequantize for this layout).
When K is not a multiple of 128 (e.g. 576) the last group is zero-padded for its amax and ceil(K / 128) scales are
stored; the codes need no padding because they are packed along N. (ModelOpt's export rejects such K; its fake
quantizer zero-pads the same way.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .common import (
    check_float_input,
    clamp_keep_nan,
    divide_exactly,
    round_half_even,
    round_to_mode,
    rounding_mode,
    use_triton,
)
from .formats import INT4_GROUP_SIZE, INT4_MAX, INT4_MAXBOUND, INT4_MIN, ZERO_AMAX_SCALE

PAIRS_PER_PROGRAM = 16  # row pairs handled by one Triton program (times one group of columns)


def int4_scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    """Group amax (measured, or clipped by AWQ's search) -> fp32 INT4 scales amax / 7 (0 -> 1.0)."""
    scale = divide_exactly(amax.float(), INT4_MAXBOUND)
    return torch.where(scale == 0, torch.full_like(scale, ZERO_AMAX_SCALE), scale)


def int4_groups(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """w [N, K] -> its groups [N, ceil(K / group_size), group_size] along K, the last zero-padded (as stored)."""
    pad = -w.shape[-1] % group_size
    return (F.pad(w, (0, pad)) if pad else w).reshape(w.shape[0], -1, group_size)


def int4_group_scale(w: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """w [N, K] -> fp32 scales [N, ceil(K / group_size)] = amax_group / 7 (zero-padded last group; 0 -> 1.0)."""
    return int4_scale_from_amax(int4_groups(w, group_size).abs().amax(dim=-1))


# ---------------------------------------------------------------------------------------------- torch reference ---
def quantize_int4_reference(w: torch.Tensor, scale: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """w [N, K] and scales [N, G] -> packed uint8 [N/2, K] (even row in the low nibble)."""
    group = torch.arange(w.shape[1], device=w.device) // group_size
    codes = (w / scale[:, group]).round().clamp(INT4_MIN, INT4_MAX).to(torch.int8)  # [N, K]
    nibbles = (codes & 0x0F).to(torch.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4_reference(qdata: torch.Tensor) -> torch.Tensor:
    """Packed uint8 [N/2, K] -> int8 codes [N, K] in [-8, 7]."""
    lo = ((qdata & 0x0F).to(torch.int8) ^ 8) - 8
    hi = ((qdata >> 4).to(torch.int8) ^ 8) - 8
    return torch.stack([lo, hi], dim=1).reshape(-1, qdata.shape[1])


def dequantize_int4_reference(qdata: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
                              group_size: int = INT4_GROUP_SIZE) -> torch.Tensor:
    """(qdata [N/2, K], scales [N, G]) -> [N, K] in `dtype`."""
    group = torch.arange(qdata.shape[1], device=qdata.device) // group_size
    return (unpack_int4_reference(qdata).float() * scale[:, group]).to(dtype)


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def int4_unpack(packed):
    """uint8/int32 bytes -> (low, high) signed 4-bit codes as int32."""
    p = packed.to(tl.int32)
    return ((p & 15) ^ 8) - 8, ((p >> 4) ^ 8) - 8


@triton.jit
def _int4_quantize_kernel(w_ptr, q_ptr, s_ptr, n_pairs, K, G, GS: tl.constexpr, BP: tl.constexpr,
                          HAS_SCALE: tl.constexpr):
    # w: [2 * n_pairs, K]; q: [n_pairs, K] uint8; s: [2 * n_pairs, G] fp32; program = (pair tile, group)
    p = tl.program_id(0) * BP + tl.arange(0, BP)  # [BP]
    grp = tl.program_id(1)
    c = grp * GS + tl.arange(0, GS)  # [GS]
    mask = (p < n_pairs)[:, None] & (c < K)[None, :]
    even = (2 * p).to(tl.int64)
    xe = tl.load(w_ptr + even[:, None] * K + c[None, :], mask=mask, other=0.0).to(tl.float32)
    xo = tl.load(w_ptr + (even + 1)[:, None] * K + c[None, :], mask=mask, other=0.0).to(tl.float32)
    s_even = s_ptr + even * G + grp
    if HAS_SCALE:
        se = tl.load(s_even, mask=p < n_pairs, other=1.0)
        so = tl.load(s_even + G, mask=p < n_pairs, other=1.0)
    else:
        se = tl.math.div_rn(tl.max(tl.abs(xe), axis=1), 7.0)
        so = tl.math.div_rn(tl.max(tl.abs(xo), axis=1), 7.0)
        se = tl.where(se == 0.0, 1.0, se)
        so = tl.where(so == 0.0, 1.0, so)
        tl.store(s_even, se, mask=p < n_pairs)
        tl.store(s_even + G, so, mask=p < n_pairs)
    # clamping before rounding gives the same integer (the bounds are integers)
    qe = round_half_even(clamp_keep_nan(tl.math.div_rn(xe, se[:, None]), -8.0, 7.0)).to(tl.int32)
    qo = round_half_even(clamp_keep_nan(tl.math.div_rn(xo, so[:, None]), -8.0, 7.0)).to(tl.int32)
    packed = (qe & 15) | ((qo & 15) << 4)
    tl.store(q_ptr + p.to(tl.int64)[:, None] * K + c[None, :], packed.to(tl.uint8), mask=mask)


@triton.jit
def _int4_dequantize_kernel(q_ptr, s_ptr, y_ptr, n_pairs, K, G, GS: tl.constexpr, BP: tl.constexpr,
                            OUT_MODE: tl.constexpr):
    # q: [n_pairs, K] uint8; s: [2 * n_pairs, G]; y: [2 * n_pairs, K]
    p = tl.program_id(0) * BP + tl.arange(0, BP)
    grp = tl.program_id(1)
    c = grp * GS + tl.arange(0, GS)
    mask = (p < n_pairs)[:, None] & (c < K)[None, :]
    lo, hi = int4_unpack(tl.load(q_ptr + p.to(tl.int64)[:, None] * K + c[None, :], mask=mask, other=0))
    even = (2 * p).to(tl.int64)
    se = tl.load(s_ptr + even * G + grp, mask=p < n_pairs, other=1.0)[:, None]
    so = tl.load(s_ptr + (even + 1) * G + grp, mask=p < n_pairs, other=1.0)[:, None]
    ye = round_to_mode(lo.to(tl.float32) * se, OUT_MODE)
    yo = round_to_mode(hi.to(tl.float32) * so, OUT_MODE)
    tl.store(y_ptr + even[:, None] * K + c[None, :], ye.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(y_ptr + (even + 1)[:, None] * K + c[None, :], yo.to(y_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------- wrappers ---
@dataclass
class Int4Tensor:
    """An INT4 weight [N, K]: qdata uint8 [N/2, K] (rows 2i / 2i+1 in the low / high nibble), scale fp32 [N, G]."""

    qdata: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    group_size: int = INT4_GROUP_SIZE

    @classmethod
    def from_float(cls, w: torch.Tensor, scale: torch.Tensor | None = None, group_size: int = INT4_GROUP_SIZE, *,
                   use_kernel: bool | None = None) -> Int4Tensor:
        """Quantize a weight w [N, K] (N even). `scale` [N, ceil(K / group_size)] defaults to amax_group / 7; pass
        smaller (e.g. AWQ-clipped) scales and the codes clamp to [-8, 7]."""
        check_float_input(w, "w")
        assert w.dim() == 2 and w.shape[0] % 2 == 0, f"INT4 weights must be [N, K] with N even, got {tuple(w.shape)}"
        n, k = w.shape
        groups = -(-k // group_size)
        if scale is not None:
            scale = scale.to(device=w.device, dtype=torch.float32).contiguous()
            assert scale.shape == (n, groups), f"scale shape {tuple(scale.shape)} != {(n, groups)}"
        if not use_triton(w, use_kernel, _int4_quantize_kernel):
            scale = int4_group_scale(w, group_size) if scale is None else scale
            return cls(quantize_int4_reference(w, scale, group_size), scale, (n, k), w.dtype, group_size)
        assert group_size & (group_size - 1) == 0 and group_size >= 16, "Triton path needs a power-of-two group"
        qdata = torch.empty(n // 2, k, dtype=torch.uint8, device=w.device)
        out_scale = torch.empty(n, groups, dtype=torch.float32, device=w.device) if scale is None else scale
        grid = (triton.cdiv(n // 2, PAIRS_PER_PROGRAM), groups)
        _int4_quantize_kernel[grid](w, qdata, out_scale, n // 2, k, groups, GS=group_size, BP=PAIRS_PER_PROGRAM,
                                    HAS_SCALE=scale is not None)
        return cls(qdata, out_scale, (n, k), w.dtype, group_size)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        """Back to a float [N, K] tensor in `dtype` (default: the original dtype)."""
        dtype = dtype or self.dtype
        n, k = self.shape
        groups = -(-k // self.group_size)
        assert self.qdata.dtype == torch.uint8 and self.qdata.shape == (n // 2, k) and self.qdata.is_contiguous()
        assert self.scale.dtype == torch.float32 and self.scale.shape == (n, groups) and self.scale.is_contiguous()
        if not use_triton(self.qdata, use_kernel, _int4_dequantize_kernel):
            return dequantize_int4_reference(self.qdata, self.scale, dtype, self.group_size)
        y = torch.empty(n, k, dtype=dtype, device=self.qdata.device)
        grid = (triton.cdiv(n // 2, PAIRS_PER_PROGRAM), groups)
        _int4_dequantize_kernel[grid](self.qdata, self.scale, y, n // 2, k, groups, GS=self.group_size,
                                      BP=PAIRS_PER_PROGRAM, OUT_MODE=rounding_mode(dtype))
        return y
