"""Shared pieces of the quantization kernels: path selection, argument checks and bit-exact Triton helpers.

Bit-exactness notes (why the helpers below do rounding by hand):
  * Triton's interpreter converts fp32 -> bf16 by truncation and fp32 -> fp8 with round-half-up and no mantissa
    carry, while torch (and the GPU `cvt.rn`) round to nearest even. So FP8 E4M3 and bf16 rounding are done here with
    integer bit operations, which give the same bits on a GPU and in the interpreter.
  * Divisions use `tl.math.div_rn` (IEEE round-to-nearest), the same as torch's `/`; plain `/` may lower to an
    approximate divide on GPUs.
  * Scales formed in torch divide by a tensor, not a Python number (`divide_exactly`): torch on CUDA turns the
    latter into a multiply by the reciprocal, so a GPU's scales would differ from the CPU's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # the interpreter class moved between Triton versions; only its type is needed
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()  # type: ignore[assignment,misc]


# Rounding modes for `round_to_mode`: what precision a value is rounded to before it is used again.
MODE_FP32: int = 0
MODE_BF16: int = 1
MODE_FP16: int = 2
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rounding_mode(dtype: torch.dtype) -> int:
    """The `round_to_mode` constant for a float dtype."""
    return {torch.float32: MODE_FP32, torch.bfloat16: MODE_BF16, torch.float16: MODE_FP16}[dtype]


def is_interpreted(kernel: object) -> bool:
    """True if `kernel` was built by `@triton.jit` while TRITON_INTERPRET=1 (it then runs on CPU tensors)."""
    return isinstance(kernel, InterpretedFunction)


def use_triton(t: torch.Tensor, use_kernel: bool | None, kernel: object) -> bool:
    """Pick the path: Triton for CUDA tensors, or on CPU when the caller asks for it and the interpreter is on.

    `use_kernel`: None = automatic (Triton on CUDA, torch reference on CPU); False = always the torch reference;
    True = Triton, raising if it cannot run here (CPU tensor without TRITON_INTERPRET=1 at import time).
    """
    if use_kernel is False:
        return False
    if t.is_cuda:
        return True
    if use_kernel and is_interpreted(kernel):
        return True
    if use_kernel:
        raise RuntimeError("Triton kernel requested for a CPU tensor, but TRITON_INTERPRET=1 was not set when "
                           "optiserve.kernels was imported")
    return False


def check_float_input(x: torch.Tensor, name: str = "x") -> None:
    """Assert `x` is a contiguous fp32/bf16/fp16 tensor with at least one dimension."""
    assert isinstance(x, torch.Tensor), f"{name} must be a tensor"
    assert x.dtype in FLOAT_DTYPES, f"{name} must be float32/bfloat16/float16, got {x.dtype}"
    assert x.dim() >= 1 and x.shape[-1] > 0, f"{name} must have a non-empty last dim, got {tuple(x.shape)}"
    assert x.is_contiguous(), f"{name} must be contiguous"


def scalar_scale(scale: torch.Tensor | float, device: torch.device) -> torch.Tensor:
    """A per-tensor scale as a 0-dim float32 tensor on `device`."""
    return torch.as_tensor(scale, dtype=torch.float32, device=device).reshape(())


def divide_exactly(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """x / divisor, one correctly rounded division on every device. Torch on CUDA multiplies by the reciprocal of a
    Python-number divisor (1 ulp off at times), so the divisor goes in as a tensor on x's device (fp32, as x is)."""
    return x / scalar_scale(divisor, x.device)


def elementwise_grid(n: int, block: int) -> tuple[int]:
    """1-D launch grid covering `n` items with `block` items per program."""
    return (triton.cdiv(n, block),)


@triton.jit
def round_to_mode(v, MODE: tl.constexpr):
    """Round fp32 `v` to bf16 (MODE 1) or fp16 (MODE 2) precision, round-to-nearest-even; result stays fp32."""
    if MODE == 1:
        bits = v.to(tl.int32, bitcast=True)
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 == 0xFFFF0000
        v = tl.where(v != v, v, r.to(tl.float32, bitcast=True))
    elif MODE == 2:
        v = v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def round_half_even(v):
    """Round fp32 `v` (|v| < 2**23) to the nearest integer, ties to even, like `torch.round`; result is fp32."""
    a = tl.abs(v)
    r = (a + 8388608.0) - 8388608.0  # adding 2**23 drops the fraction with the FPU's nearest-even rounding
    return tl.where(v < 0, -r, r)


@triton.jit
def e4m3_encode(v):
    """fp32 -> FP8 E4M3FN bits (uint8), round-to-nearest-even, same as torch `.to(torch.float8_e4m3fn)`.

    `v` must already be clamped to [-448, 448] (NaN passes through as 0x7F | sign).
    """
    bits = v.to(tl.int32, bitcast=True)
    sign = tl.where(bits < 0, 0x80, 0)
    a_bits = bits & 0x7FFFFFFF
    a = a_bits.to(tl.float32, bitcast=True)
    # normal range (|v| >= 2**-6): keep 3 mantissa bits with round-to-nearest-even, rebias exponent 127 -> 7
    normal = ((a_bits + 0x7FFFF + ((a_bits >> 20) & 1)) >> 20) - (120 << 3)
    # subnormal range: multiples of 2**-9; the magic add rounds |v| * 512 to an integer, ties to even
    small = tl.where(a < 0.015625, a, 0.0)  # keeps the int cast below in range (and NaN out of it)
    sub = ((small * 512.0 + 8388608.0) - 8388608.0).to(tl.int32)
    code = tl.where(a >= 0.015625, normal, sub)
    code = tl.where(a != a, 0x7F, code)
    return (code | sign).to(tl.uint8)


@triton.jit
def e4m3_decode(b):
    """FP8 E4M3FN bits (any int type holding 0..255) -> fp32 value."""
    b = b.to(tl.int32)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = (((exp + 120) << 23) | (man << 20)).to(tl.float32, bitcast=True)
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal)
    nan = (b * 0 + 0x7FC00000).to(tl.float32, bitcast=True)
    mag = tl.where((b & 0x7F) == 0x7F, nan, mag)
    # The sign bit set directly: compiled Triton spells `-mag` as `0 - mag`, which loses the sign of zero.
    return (mag.to(tl.int32, bitcast=True) | ((b & 0x80) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def clamp_keep_nan(v, lo, hi):
    """Clamp like `torch.clamp` (NaN stays NaN; `tl.minimum` on GPUs would drop it)."""
    return tl.where(v > hi, hi, tl.where(v < lo, lo, v))
