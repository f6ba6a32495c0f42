"""NVFP4: E2M1 values in blocks of 16 along the last dim, an FP8 E4M3 scale per block and an FP32 per-tensor scale.

Bit-for-bit the same as ModelOpt `NVFP4QTensor.quantize` / `.dequantize`
(modelopt/torch/quantization/qtensor/nvfp4_tensor.py):
  s2          = amax(x).float() / (6 * 448)                                  `get_weights_scaling_factor_2`
  block_scale = amax_block.float() / (6 * s2)  (the product 6 * s2 is formed first, then one division)
  block_scale = 1.0 where it is 0; clamp to [2**-9, 448]; cast to float8_e4m3fn   `_cast_per_block_scale_to_fp8`
  scaled      = x / (block_scale.float() * s2)   (a true division in fp32, not a multiply by a reciprocal)
  code        = E2M1 round-to-nearest, ties to the even code; sign bit = (scaled < 0), so -0.0 -> 0x0 but a
                negative value that rounds to zero -> 0x8; |scaled| > 6 saturates to 6; NaN -> 0x7   `_cast_fp4`
  byte        = code[2i] | code[2i + 1] << 4   (even index in the low nibble)
  dequant     = e2m1_table[code] * (block_scale.float() * s2), in fp32, then cast (0x8 decodes to +0.0)
The last dim is zero-padded to a multiple of 16 (`reduce_block_padding`); `dequantize` crops the padding again.
Exception: an all-zero tensor gets s2 = 1.0 here (ModelOpt divides 0 by 0 and produces NaN scales).
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
    e4m3_decode,
    e4m3_encode,
    round_to_mode,
    rounding_mode,
    scalar_scale,
    use_triton,
)
from .formats import (
    E2M1_BOUNDS,
    E2M1_MAX,
    E2M1_SIGN_BIT,
    E2M1_VALUES,
    NVFP4_BLOCK_SIZE,
    NVFP4_GLOBAL_DIVISOR,
    NVFP4_SCALE_MAX,
    NVFP4_SCALE_MIN,
    ZERO_AMAX_SCALE,
)

BLOCKS_PER_PROGRAM = 64  # 16-element blocks handled by one Triton program


def nvfp4_per_tensor_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """The FP32 per-tensor scale s2 = amax / (6 * 448) for a (calibrated or measured) amax; 1.0 if amax is 0."""
    amax = torch.as_tensor(amax).float().reshape(())
    s2 = divide_exactly(amax, NVFP4_GLOBAL_DIVISOR)
    return torch.where(s2 == 0, torch.ones_like(s2), s2)


# ---------------------------------------------------------------------------------------------- torch reference ---
def e2m1_encode_reference(v: torch.Tensor) -> torch.Tensor:
    """Round fp32 values (already divided by their scale) to 4-bit E2M1 codes (uint8 in 0..15), ModelOpt's rule."""
    a = v.abs()
    idx = torch.zeros(v.shape, dtype=torch.uint8, device=v.device)
    for i, bound in enumerate(E2M1_BOUNDS):
        # ties: a bound at an even position rounds down (0.25, 1.25, 2.5, 5), at an odd one up (0.75, 1.75, 3.5)
        idx += (a > bound) if i % 2 == 0 else (a >= bound)
    idx = torch.where(torch.isnan(a), torch.full_like(idx, 7), idx)
    return idx | ((v < 0).to(torch.uint8) * E2M1_SIGN_BIT)


def e2m1_decode_reference(codes: torch.Tensor) -> torch.Tensor:
    """4-bit E2M1 codes -> fp32 values; the sign-only code 0x8 decodes to +0.0 (ModelOpt's table)."""
    table = torch.tensor([*E2M1_VALUES, *[-v for v in E2M1_VALUES]], dtype=torch.float32, device=codes.device)
    table[8] = 0.0  # -0.0 -> +0.0
    return table[codes.long()]


def nvfp4_blocks(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] -> its 16-element blocks [..., nb, 16], the last zero-padded."""
    pad = -x.shape[-1] % NVFP4_BLOCK_SIZE
    xp = F.pad(x, (0, pad)) if pad else x
    return xp.reshape(*xp.shape[:-1], -1, NVFP4_BLOCK_SIZE)


def nvfp4_block_scale(raw: torch.Tensor) -> torch.Tensor:
    """Block scales amax_block / (6 * s2) (or a multiple) -> the FP8 E4M3 scales stored: a zero scale (all-zero
    block) becomes 1.0, then clamped to [2^-9, 448] and cast (ModelOpt's rule; `encode_block_pairs` in Triton)."""
    raw = torch.where(raw == 0, torch.full_like(raw, ZERO_AMAX_SCALE), raw)
    return raw.clamp(min=NVFP4_SCALE_MIN, max=NVFP4_SCALE_MAX).to(torch.float8_e4m3fn)


def pack_e2m1_pairs(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 codes [..., Kp] -> bytes [..., Kp/2], the even element in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def quantize_nvfp4_reference(x: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., K] -> (qdata uint8 [..., Kp/2], block scales float8_e4m3fn [..., Kp/16]), Kp = K rounded up to 16."""
    blocks = nvfp4_blocks(x)  # [..., nb, 16]
    scale = nvfp4_block_scale(blocks.abs().amax(dim=-1).float() / (E2M1_MAX * s2))  # [..., nb]
    scaled = blocks / (scale.float() * s2).unsqueeze(-1)  # fp32 [..., nb, 16]
    codes = e2m1_encode_reference(scaled).flatten(-2)  # [..., Kp]
    return pack_e2m1_pairs(codes), scale


def dequantize_nvfp4_reference(qdata: torch.Tensor, scale: torch.Tensor, s2: torch.Tensor, k: int,
                               dtype: torch.dtype) -> torch.Tensor:
    """(qdata [..., Kp/2], scale [..., Kp/16], s2) -> values [..., k] in `dtype`."""
    codes = torch.stack([qdata & 0x0F, qdata >> 4], dim=-1).reshape(*qdata.shape[:-1], -1)  # [..., Kp]
    vals = e2m1_decode_reference(codes).reshape(*scale.shape, NVFP4_BLOCK_SIZE)  # [..., nb, 16]
    out = vals * (scale.float() * s2).unsqueeze(-1)
    return out.reshape(*qdata.shape[:-1], -1)[..., :k].to(dtype)


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def e2m1_encode(v):
    """fp32 (already scaled) -> E2M1 code as int32 0..15; same rule as `e2m1_encode_reference`."""
    a = tl.abs(v)
    idx = (a > 0.25).to(tl.int32) + (a >= 0.75).to(tl.int32) + (a > 1.25).to(tl.int32)
    idx += (a >= 1.75).to(tl.int32) + (a > 2.5).to(tl.int32) + (a >= 3.5).to(tl.int32) + (a > 5.0).to(tl.int32)
    idx = tl.where(a != a, 7, idx)
    return idx + tl.where(v < 0, 8, 0)


@triton.jit
def e2m1_decode(code):
    """E2M1 code (int32 0..15) -> fp32 value; 0x8 gives +0.0."""
    m = code & 7
    mag = tl.where(m < 4, m.to(tl.float32) * 0.5,
                   tl.where(m == 4, 2.0, tl.where(m == 5, 3.0, tl.where(m == 6, 4.0, 6.0))))
    return tl.where((code & 8) != 0, 0.0 - mag, mag)


@triton.jit
def load_block_pairs(x_ptr, g, gmask, nb, K):
    """The even and odd elements [BLOCKS, 8] (fp32) of 16-element blocks `g` of x [R, K] (block g = row * nb + blk),
    zero past K: what a quantize kernel reads."""
    row = (g // nb).to(tl.int64)
    j = tl.arange(0, 8)
    col = (g % nb)[:, None] * 16 + 2 * j[None, :]  # [BLOCKS, 8] column of the even element
    ptr = x_ptr + row[:, None] * K + col
    xe = tl.load(ptr, mask=gmask[:, None] & (col < K), other=0.0).to(tl.float32)
    xo = tl.load(ptr + 1, mask=gmask[:, None] & (col + 1 < K), other=0.0).to(tl.float32)
    return xe, xo


@triton.jit
def amax_block_scale(xe, xo, s2):
    """The standard block scale amax_block / (6 * s2) [BLOCKS] of blocks given as their even/odd pairs."""
    amax = tl.maximum(tl.max(tl.abs(xe), axis=1), tl.max(tl.abs(xo), axis=1))
    return tl.math.div_rn(amax, 6.0 * s2)


@triton.jit
def encode_block_pairs(xe, xo, raw_scale, s2):
    """Encode blocks (even/odd pairs [BLOCKS, 8]) under block scales `raw_scale` [BLOCKS] as `nvfp4_block_scale`
    stores them: (FP8 bits [BLOCKS], step = decoded scale * s2 [BLOCKS, 1], even codes, odd codes [BLOCKS, 8])."""
    bscale = tl.where(raw_scale == 0.0, 1.0, raw_scale)
    sbits = e4m3_encode(clamp_keep_nan(bscale, 0.001953125, 448.0))
    step = (e4m3_decode(sbits) * s2)[:, None]
    return sbits, step, e2m1_encode(tl.math.div_rn(xe, step)), e2m1_encode(tl.math.div_rn(xo, step))


@triton.jit
def _nvfp4_quantize_kernel(x_ptr, q_ptr, s_ptr, s2_ptr, n_blocks, nb, K, BLOCKS: tl.constexpr):
    # x: [R, K] contiguous; q: [R, nb * 8] uint8; s: [R, nb] E4M3 bits; block g = row * nb + blk
    g = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    gmask = g < n_blocks
    j = tl.arange(0, 8)  # pair index inside a block
    xe, xo = load_block_pairs(x_ptr, g, gmask, nb, K)
    s2 = tl.load(s2_ptr)
    sbits, _, ce, co = encode_block_pairs(xe, xo, amax_block_scale(xe, xo, s2), s2)
    tl.store(s_ptr + g, sbits, mask=gmask)
    tl.store(q_ptr + g.to(tl.int64)[:, None] * 8 + j[None, :], (ce | (co << 4)).to(tl.uint8), mask=gmask[:, None])


@triton.jit
def _nvfp4_dequantize_kernel(q_ptr, s_ptr, s2_ptr, y_ptr, n_blocks, nb, K, BLOCKS: tl.constexpr,
                             OUT_MODE: tl.constexpr):
    # q: [R, nb * 8] uint8; s: [R, nb] E4M3 bits; y: [R, K] contiguous
    g = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)
    gmask = g < n_blocks
    row = (g // nb).to(tl.int64)
    j = tl.arange(0, 8)
    col = (g % nb)[:, None] * 16 + 2 * j[None, :]  # [BLOCKS, 8]
    packed = tl.load(q_ptr + g.to(tl.int64)[:, None] * 8 + j[None, :], mask=gmask[:, None], other=0).to(tl.int32)
    scale = (e4m3_decode(tl.load(s_ptr + g, mask=gmask, other=0)) * tl.load(s2_ptr))[:, None]
    ye = round_to_mode(e2m1_decode(packed & 15) * scale, OUT_MODE)
    yo = round_to_mode(e2m1_decode(packed >> 4) * scale, OUT_MODE)
    ptr = y_ptr + row[:, None] * K + col
    tl.store(ptr, ye.to(y_ptr.dtype.element_ty), mask=gmask[:, None] & (col < K))
    tl.store(ptr + 1, yo.to(y_ptr.dtype.element_ty), mask=gmask[:, None] & (col + 1 < K))


# ---------------------------------------------------------------------------------------------------- wrappers ---
@dataclass
class NVFP4Tensor:
    """An NVFP4-quantized tensor of original shape `shape` ([..., K]) and dtype `dtype`.

    qdata: uint8 [..., Kp/2], two E2M1 codes per byte, even index in the low nibble (Kp = K rounded up to 16).
    scale: float8_e4m3fn [..., Kp/16], one per 16-element block.
    per_tensor_scale: float32 [], s2.
    """

    qdata: torch.Tensor
    scale: torch.Tensor
    per_tensor_scale: torch.Tensor
    shape: tuple[int, ...]
    dtype: torch.dtype
    block_size: int = NVFP4_BLOCK_SIZE

    @classmethod
    def from_float(cls, x: torch.Tensor, per_tensor_scale: torch.Tensor | float | None = None, *,
                   use_kernel: bool | None = None) -> NVFP4Tensor:
        """Quantize `x` [..., K]. Without `per_tensor_scale`, s2 comes from amax(x) (weights); with it, the block
        scales are still computed from `x` at run time (the activation / KV-cache path with a calibrated s2)."""
        check_float_input(x)
        s2 = nvfp4_per_tensor_scale(x.abs().amax()) if per_tensor_scale is None else per_tensor_scale
        s2 = scalar_scale(s2, x.device)
        k = x.shape[-1]
        nb = -(-k // NVFP4_BLOCK_SIZE)
        if use_triton(x, use_kernel, _nvfp4_quantize_kernel):
            rows = x.numel() // k
            qdata = torch.empty(*x.shape[:-1], nb * 8, dtype=torch.uint8, device=x.device)
            scale = torch.empty(*x.shape[:-1], nb, dtype=torch.float8_e4m3fn, device=x.device)
            grid = (triton.cdiv(rows * nb, BLOCKS_PER_PROGRAM),)
            _nvfp4_quantize_kernel[grid](x, qdata, scale.view(torch.uint8), s2, rows * nb, nb, k,
                                         BLOCKS=BLOCKS_PER_PROGRAM)
        else:
            qdata, scale = quantize_nvfp4_reference(x, s2)
        return cls(qdata, scale, s2, tuple(x.shape), x.dtype)

    def dequantize(self, dtype: torch.dtype | None = None, *, use_kernel: bool | None = None) -> torch.Tensor:
        """Back to a float tensor of `self.shape` in `dtype` (default: the original dtype)."""
        dtype = dtype or self.dtype
        k = self.shape[-1]
        nb = self.scale.shape[-1]
        assert self.qdata.dtype == torch.uint8 and self.qdata.is_contiguous() and self.qdata.shape[-1] == nb * 8
        assert self.scale.dtype == torch.float8_e4m3fn and self.scale.is_contiguous()
        assert self.qdata.shape[:-1] == self.scale.shape[:-1] == torch.Size(self.shape[:-1])
        assert nb == -(-k // NVFP4_BLOCK_SIZE), "scale count does not match the last dim"
        if not use_triton(self.qdata, use_kernel, _nvfp4_dequantize_kernel):
            return dequantize_nvfp4_reference(self.qdata, self.scale, self.per_tensor_scale, k, dtype)
        y = torch.empty(self.shape, dtype=dtype, device=self.qdata.device)
        n_blocks = self.scale.numel()
        grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
        _nvfp4_dequantize_kernel[grid](self.qdata, self.scale.view(torch.uint8), self.per_tensor_scale, y, n_blocks,
                                       nb, k, BLOCKS=BLOCKS_PER_PROGRAM, OUT_MODE=rounding_mode(dtype))
        return y


def quantize_nvfp4_activation(x: torch.Tensor, global_scale: torch.Tensor | float, *,
                              use_kernel: bool | None = None) -> NVFP4Tensor:
    """Activation / KV-cache path: block scales from `x` at run time, the calibrated per-tensor scale `global_scale`
    (s2 = calibrated_amax / (6 * 448), see `nvfp4_per_tensor_scale`). Blocks above the calibrated range clamp their
    scale to 448 and saturate to +-6."""
    return NVFP4Tensor.from_float(x, global_scale, use_kernel=use_kernel)
