"""Fused dequantize-GEMM for quantized weights: y[M, N] = x[M, K] @ dequant(W)[N, K].T.

The weight tiles are dequantized in registers (never written out) and fed to `tl.dot` with an fp32 accumulator.
Results agree with the torch reference (`x.float() @ W.dequantize(float32).T`) within a tolerance, not bit for bit:
the summation order differs, and on GPUs bf16/fp16 activations multiply bf16/fp16-rounded weights.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import check_float_input, e4m3_decode, is_interpreted, round_to_mode, rounding_mode, use_triton
from .int4 import Int4Tensor, int4_unpack
from .nvfp4 import NVFP4Tensor, e2m1_decode

BLOCK_M = 16
BLOCK_N = 32  # output columns per program (for INT4: 16 row pairs)
BLOCK_KP = 32  # NVFP4: packed bytes (= 64 elements) per K step
BLOCK_K = 64  # INT4: elements per K step


def _flatten(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [..., K] -> contiguous [M, K] after checks."""
    check_float_input(x)
    assert x.shape[-1] == k, f"x last dim {x.shape[-1]} != weight K {k}"
    return x.reshape(-1, k)


def _dot_args(dtype: torch.dtype, kernel: object) -> dict:
    """`tl.dot` operand dtype and precision: x's dtype on GPUs (full fp32, no TF32, for fp32 x); always fp32 in the
    interpreter, whose `tl.dot` multiplies the raw uint16 bits of bf16 operands."""
    out = {"OUT_MODE": rounding_mode(dtype)}
    if dtype == torch.float32 or is_interpreted(kernel):
        return {**out, "DOT_DTYPE": tl.float32, "PRECISION": "ieee"}
    return {**out, "DOT_DTYPE": tl.bfloat16 if dtype == torch.bfloat16 else tl.float16, "PRECISION": None}


# ---------------------------------------------------------------------------------------------- torch reference ---
def linear_reference(x: torch.Tensor, w: NVFP4Tensor | Int4Tensor) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(w).T computed in fp32, returned in x's dtype."""
    y = x.float() @ w.dequantize(torch.float32, use_kernel=False).T
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------------- Triton ---
@triton.jit
def _nvfp4_gemm_kernel(x_ptr, q_ptr, s_ptr, s2_ptr, y_ptr, M, N, K, KP, NB, BM: tl.constexpr, BN: tl.constexpr,
                       BKP: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
                       OUT_MODE: tl.constexpr):
    # x: [M, K]; q: [N, KP] uint8 (KP = Kp / 2); s: [N, NB] E4M3 bits; y: [M, N]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok = rm < M
    n_ok = rn < N
    s2 = tl.load(s2_ptr)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, KP, BKP):
        jp = k0 + tl.arange(0, BKP)  # packed column = pair of K elements (2 jp, 2 jp + 1)
        ke = 2 * jp
        x_rows = x_ptr + rm.to(tl.int64)[:, None] * K
        xe = tl.load(x_rows + ke[None, :], mask=m_ok[:, None] & (ke < K)[None, :], other=0.0)  # [BM, BKP]
        xo = tl.load(x_rows + ke[None, :] + 1, mask=m_ok[:, None] & (ke + 1 < K)[None, :], other=0.0)
        w_mask = n_ok[:, None] & (jp < KP)[None, :]
        packed = tl.load(q_ptr + rn.to(tl.int64)[:, None] * KP + jp[None, :], mask=w_mask, other=0).to(tl.int32)
        sbits = tl.load(s_ptr + rn.to(tl.int64)[:, None] * NB + (jp // 8)[None, :], mask=w_mask, other=0)
        scale = e4m3_decode(sbits) * s2  # [BN, BKP]
        we = (e2m1_decode(packed & 15) * scale).to(DOT_DTYPE)
        wo = (e2m1_decode(packed >> 4) * scale).to(DOT_DTYPE)
        acc += tl.dot(xe.to(DOT_DTYPE), tl.trans(we), input_precision=PRECISION)
        acc += tl.dot(xo.to(DOT_DTYPE), tl.trans(wo), input_precision=PRECISION)
    y_ptrs = y_ptr + rm.to(tl.int64)[:, None] * N + rn[None, :]
    tl.store(y_ptrs, round_to_mode(acc, OUT_MODE).to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _int4_gemm_kernel(x_ptr, q_ptr, s_ptr, y_ptr, M, N, K, G, GS: tl.constexpr, BM: tl.constexpr,
                      BNP: tl.constexpr, BK: tl.constexpr, DOT_DTYPE: tl.constexpr,
                      PRECISION: tl.constexpr, OUT_MODE: tl.constexpr):
    # x: [M, K]; q: [N / 2, K] uint8 (rows 2p / 2p + 1 in the low / high nibble); s: [N, G] fp32; y: [M, N]
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    p = tl.program_id(1) * BNP + tl.arange(0, BNP)  # row pairs
    m_ok = rm < M
    p_ok = p < N // 2
    even = (2 * p).to(tl.int64)
    acc_e = tl.zeros((BM, BNP), dtype=tl.float32)
    acc_o = tl.zeros((BM, BNP), dtype=tl.float32)
    for k0 in range(0, K, BK):
        k = k0 + tl.arange(0, BK)
        k_ok = k < K
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = p_ok[:, None] & k_ok[None, :]
        lo, hi = int4_unpack(tl.load(q_ptr + p.to(tl.int64)[:, None] * K + k[None, :], mask=w_mask, other=0))
        s_e = tl.load(s_ptr + even[:, None] * G + (k // GS)[None, :], mask=w_mask, other=0.0)  # [BNP, BK]
        s_o = tl.load(s_ptr + (even + 1)[:, None] * G + (k // GS)[None, :], mask=w_mask, other=0.0)
        x = x.to(DOT_DTYPE)
        we = (lo.to(tl.float32) * s_e).to(DOT_DTYPE)
        wo = (hi.to(tl.float32) * s_o).to(DOT_DTYPE)
        acc_e += tl.dot(x, tl.trans(we), input_precision=PRECISION)
        acc_o += tl.dot(x, tl.trans(wo), input_precision=PRECISION)
    y_rows = y_ptr + rm.to(tl.int64)[:, None] * N
    out_mask = m_ok[:, None] & p_ok[None, :]
    tl.store(y_rows + even[None, :], round_to_mode(acc_e, OUT_MODE).to(y_ptr.dtype.element_ty), mask=out_mask)
    tl.store(y_rows + even[None, :] + 1, round_to_mode(acc_o, OUT_MODE).to(y_ptr.dtype.element_ty), mask=out_mask)


# ---------------------------------------------------------------------------------------------------- wrappers ---
def nvfp4_linear(x: torch.Tensor, w: NVFP4Tensor, *, use_kernel: bool | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(w).T for an NVFP4 weight w of shape [N, K]; y has x's dtype."""
    assert len(w.shape) == 2, f"NVFP4 weight must be 2-D, got {w.shape}"
    n, k = w.shape
    x2 = _flatten(x, k)
    if not use_triton(x2, use_kernel, _nvfp4_gemm_kernel):
        return linear_reference(x, w)
    assert w.qdata.is_contiguous() and w.scale.is_contiguous() and w.qdata.device == x.device
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _nvfp4_gemm_kernel[grid](x2, w.qdata, w.scale.view(torch.uint8), w.per_tensor_scale, y, m, n, k,
                             w.qdata.shape[1], w.scale.shape[1], BM=BLOCK_M, BN=BLOCK_N, BKP=BLOCK_KP,
                             **_dot_args(x.dtype, _nvfp4_gemm_kernel))
    return y.reshape(*x.shape[:-1], n)


def int4_linear(x: torch.Tensor, w: Int4Tensor, *, use_kernel: bool | None = None) -> torch.Tensor:
    """y [..., N] = x [..., K] @ dequant(w).T for an INT4 AWQ weight w of shape [N, K]; y has x's dtype."""
    n, k = w.shape
    x2 = _flatten(x, k)
    if not use_triton(x2, use_kernel, _int4_gemm_kernel):
        return linear_reference(x, w)
    assert w.qdata.is_contiguous() and w.scale.is_contiguous() and w.qdata.device == x.device
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n // 2, BLOCK_N // 2))
    _int4_gemm_kernel[grid](x2, w.qdata, w.scale, y, m, n, k, w.scale.shape[1], GS=w.group_size, BM=BLOCK_M,
                            BNP=BLOCK_N // 2, BK=BLOCK_K, **_dot_args(x.dtype, _int4_gemm_kernel))
    return y.reshape(*x.shape[:-1], n)
