"""Helpers shared by the kernel tests."""

from __future__ import annotations

import pytest
import torch

from optiserve.engine.ops import cpu_flags

_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
# This CPU's packed-kernel build without AMX tiles (`packed_linear.build(NO_AMX)`): where the CPU has AMX-INT8, the
# VNNI loops it would otherwise skip from `AMX_MIN_ROWS_*` rows on (csrc/packed_ops.h) must give the same bits.
NO_AMX = ["-O3", "-march=native", "-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16", "-fopenmp"]
# An AVX2 build (run where the CPU also has AVX-512), tuned for AMD Zen: GCC's Zen tuning splits multiply-add chains
# that the source leaves to contraction, which once gave many-row calls other bits than 1-row calls on Zen CPUs alone.
AVX2 = ["-O3", "-march=haswell", "-mtune=znver2", "-fopenmp"]


# `AVX2` is a build of its own only where the CPU has AVX-512 too (on an AVX2-only CPU the native build is it).
AVX2_BUILD_DISTINCT = {"avx512f", "avx2", "fma"} <= cpu_flags()
needs_distinct_avx2_build = pytest.mark.skipif(not AVX2_BUILD_DISTINCT, reason="builds for AVX2 on an AVX-512 CPU")


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern of a tensor as an integer tensor (so -0.0 != 0.0 and NaN == NaN)."""
    return t.contiguous().view(_INT_VIEW[t.element_size()])


def assert_bits_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    """Assert same dtype, shape and bit pattern, reporting the first mismatch."""
    assert a.dtype == b.dtype, f"dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    diff = (bits(a) != bits(b)).nonzero()
    if len(diff):
        i = tuple(diff[0].tolist())
        raise AssertionError(f"{len(diff)} of {a.numel()} differ; first at {i}: {a[i]!r} vs {b[i]!r}")


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio of `y` against `x` in dB."""
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


def wide_range(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian values times 2**U(-8, 8), with zeros, -0.0 and an all-zero 16-block sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-8, 9, shape, generator=g).float())
    flat = x.view(-1)
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)] = 0.0
    flat[torch.randint(0, flat.numel(), (max(1, flat.numel() // 20),), generator=g)] = -0.0
    if x.shape[-1] >= 32:
        x[..., 16:32] = 0.0
    return x.to(dtype)
