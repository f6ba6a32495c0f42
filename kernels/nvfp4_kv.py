"""NVFP4 for the KV cache: the standard NVFP4 layout and decode, with a searched block scale.

Decoding is exactly `NVFP4Tensor.dequantize` (codes x FP8 block scale x per-tensor scale s2), so a tensor made here
means what any NVFP4 tensor means. Only the encoder differs from ModelOpt's `NVFP4QTensor.quantize`: instead of
block_scale = amax_block / (6 * s2), each block tries block_scale = amax_block / (6 * s2) * f for every f in
`NVFP4_KV_SCALE_FACTORS` (each cast to FP8 as usual) and keeps the one whose decoded block has the least squared
error (the first such f on a tie, and f = 1.0 is first). Keys are small-block data with a few dominant channels,
where amax scaling wastes E2M1's coarse top step; the search costs 10 encodes per written token, nothing per read.

The kernel gives the reference's bits, except where two candidates' squared errors differ by less than the rounding
of their 16-term sums (the two sum in different orders): then either encoding is as good, and they may differ.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_float_input, scalar_scale, use_triton
from .formats import E2M1_MAX, NVFP4_BLOCK_SIZE, NVFP4_KV_SCALE_FACTORS
from .nvfp4 import (
    BLOCKS_PER_PROGRAM,
    NVFP4Tensor,
    amax_block_scale,
    e2m1_decode,
    e2m1_decode_reference,
    e2m1_encode_reference,
    encode_block_pairs,
    load_block_pairs,
    nvfp4_block_scale,
    nvfp4_blocks,
    pack_e2m1_pairs,
)


# ---------------------------------------------------------------------------------------------- torch reference ---
def quantize_nvfp4_kv_reference(x: torch.Tensor, s2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[..., K] -> (qdata uint8 [..., Kp/2], block scales float8_e4m3fn [..., Kp/16]) with searched block scales.
    All candidates at once (a decode step writes a few tiny tensors per layer: one pass, not ten, is what costs)."""
    blocks = nvfp4_blocks(x.float()).unsqueeze(-2)  # [..., nb, 1, 16]
    factors = torch.tensor(NVFP4_KV_SCALE_FACTORS, device=x.device)  # [F]
    scale = nvfp4_block_scale(blocks.abs().amax(dim=-1) / (E2M1_MAX * s2) * factors)  # [..., nb, F]
    step = (scale.float() * s2).unsqueeze(-1)  # [..., nb, F, 1]
    codes = e2m1_encode_reference(blocks / step)  # [..., nb, F, 16]
    d = e2m1_decode_reference(codes) * step - blocks
    err = (d[..., 0::2] ** 2 + d[..., 1::2] ** 2).sum(-1)  # [..., nb, F]; even/odd pairs, as the kernel sums
    best = err.argmin(dim=-1, keepdim=True)  # the first of equal errors, so f = 1.0 wins a tie
    codes = codes.gather(-2, best.unsqueeze(-1).expand(*best.shape, NVFP4_BLOCK_SIZE))  # [..., nb, 1, 16]
    best_scale = scale.view(torch.uint8).gather(-1, best).squeeze(-1).view(torch.float8_e4m3fn)  # [..., nb]
    return pack_e2m1_pairs(codes.reshape(*x.shape[:-1], -1)), best_scale  # codes [..., Kp]


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def _nvfp4_kv_quantize_kernel(x_ptr, q_ptr, s_ptr, s2_ptr, f_ptr, n_blocks, nb, K, BLOCKS: tl.constexpr,
                              N_FACTORS: tl.constexpr):
    # x: [R, K] contiguous; q: [R, nb * 8] uint8; s: [R, nb] E4M3 bits; f: [N_FACTORS] fp32; block g = row*nb + blk
    g = tl.program_id(0) * BLOCKS + tl.arange(0, BLOCKS)  # [BLOCKS]
    gmask = g < n_blocks
    j = tl.arange(0, 8)  # pair index inside a block
    xe, xo = load_block_pairs(x_ptr, g, gmask, nb, K)
    s2 = tl.load(s2_ptr)
    base = amax_block_scale(xe, xo, s2)  # [BLOCKS]
    for i in tl.static_range(N_FACTORS):
        sbits, step, ce, co = encode_block_pairs(xe, xo, base * tl.load(f_ptr + i), s2)
        de = e2m1_decode(ce) * step - xe
        do = e2m1_decode(co) * step - xo
        err = tl.sum(de * de + do * do, axis=1)  # [BLOCKS]
        if i == 0:
            best_e, best_o, best_s, best_err = ce, co, sbits, err
        else:
            better = err < best_err
            best_e = tl.where(better[:, None], ce, best_e)
            best_o = tl.where(better[:, None], co, best_o)
            best_s = tl.where(better, sbits, best_s)
            best_err = tl.where(better, err, best_err)
    tl.store(s_ptr + g, best_s, mask=gmask)
    tl.store(q_ptr + g.to(tl.int64)[:, None] * 8 + j[None, :], (best_e | (best_o << 4)).to(tl.uint8),
             mask=gmask[:, None])


# ---------------------------------------------------------------------------------------------------- wrapper ---
def quantize_nvfp4_kv(x: torch.Tensor, per_tensor_scale: torch.Tensor | float, *,
                      use_kernel: bool | None = None) -> NVFP4Tensor:
    """Quantize K or V `x` [..., D] to NVFP4 with the calibrated per-tensor scale (`k_scale`/`v_scale`, s2) and
    searched block scales; `.dequantize()` decodes it like any `NVFP4Tensor`."""
    check_float_input(x)
    s2 = scalar_scale(per_tensor_scale, x.device)
    k = x.shape[-1]
    nb = -(-k // NVFP4_BLOCK_SIZE)
    if not use_triton(x, use_kernel, _nvfp4_kv_quantize_kernel):
        qdata, scale = quantize_nvfp4_kv_reference(x, s2)
        return NVFP4Tensor(qdata, scale, s2, tuple(x.shape), x.dtype)
    rows = x.numel() // k
    qdata = torch.empty(*x.shape[:-1], nb * 8, dtype=torch.uint8, device=x.device)
    scale = torch.empty(*x.shape[:-1], nb, dtype=torch.float8_e4m3fn, device=x.device)
    factors = torch.tensor(NVFP4_KV_SCALE_FACTORS, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(rows * nb, BLOCKS_PER_PROGRAM),)
    _nvfp4_kv_quantize_kernel[grid](x, qdata, scale.view(torch.uint8), s2, factors, rows * nb, nb, k,
                                    BLOCKS=BLOCKS_PER_PROGRAM, N_FACTORS=len(NVFP4_KV_SCALE_FACTORS))
    return NVFP4Tensor(qdata, scale, s2, tuple(x.shape), x.dtype)
