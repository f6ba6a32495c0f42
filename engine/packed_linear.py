"""The CPU matmul from packed weights: y = x @ W.T (+ b) for NVFP4 (W4A16 and W4A4), INT4, INT8, FP8 and bf16 shards,
computed by `csrc/packed_linear.cpp` without an fp32 copy of the weight.

The kernel decodes a few weight rows at a time into a tile in cache (bit for bit the values of the format's
dequantize reference in `kernels/`) and multiplies every input row against it in fp32, so a result equals the fp32
product of the dequantized weight and the (quantized) activations up to summation order, and an n-row call gives
each row bit for bit the 1-row result. Activations are quantized here first for the formats that quantize them
(`quant.fake_quant_activation`, the same step the compute copy takes).

One record per format (`PackedFormat`): the kernel's format code and how its shards are passed. The extension is
built apart from `ops` (its own name, same flags and cache rule), and `load()` is None where it cannot be built or
`OPTISERVE_PACKED_KERNEL=0`: `QuantLinear` then keeps its fp32 compute copy.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch

from optiserve.engine import ops
from optiserve.kernels.formats import INT4_GROUP_SIZE

log = logging.getLogger(__name__)

SOURCES = ["packed_linear.cpp"]


@dataclass(frozen=True)
class PackedFormat:
    """How one weight format reaches the kernel: its code, and its shard -> (codes, scales, per-tensor scale)."""

    code: int
    operands: Callable[[object], tuple[torch.Tensor, torch.Tensor, float]]


def _nvfp4(s) -> tuple[torch.Tensor, torch.Tensor, float]:  # codes [N, Kp/2], E4M3 bits [N, Kp/16], s2
    return s.qdata, s.scale.view(torch.uint8), float(s.per_tensor_scale)


def _int4(s) -> tuple[torch.Tensor, torch.Tensor, float]:  # codes [N/2, K] (row pairs), fp32 [N, G]
    assert s.group_size == INT4_GROUP_SIZE, "the INT4 kernel is built for the exported group size"
    return s.qdata, s.scale, 1.0


def _int8(s) -> tuple[torch.Tensor, torch.Tensor, float]:  # codes [N, K], per-channel fp32 [N]
    return s.qdata.view(torch.uint8), s.scale.reshape(-1), 1.0


def _fp8(s) -> tuple[torch.Tensor, torch.Tensor, float]:  # E4M3 bits [N, K], per-tensor scale
    return s.qdata.view(torch.uint8), s.scale, float(s.scale)


def _bf16(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:  # a plain bf16 weight [N, K] -> bytes [N, 2K]
    return w.contiguous().view(torch.uint8), torch.empty(0), 1.0


PACKED_FORMATS = {
    "nvfp4": PackedFormat(0, _nvfp4),
    "nvfp4-w4a16": PackedFormat(0, _nvfp4),
    "int4": PackedFormat(1, _int4),
    "int8": PackedFormat(2, _int8),
    "fp8": PackedFormat(3, _fp8),
    "bf16": PackedFormat(4, _bf16),
}


def build(cflags: list[str] = ops.CFLAGS) -> ModuleType:
    """Compile (or load the cached build of) the packed-weight kernel with `cflags`; raises when the build fails."""
    from torch.utils.cpp_extension import load as load_extension

    name = ops.build_name(cflags).replace("optiserve_cpu_", "optiserve_packed_")
    return load_extension(name, [str(ops.CSRC / s) for s in SOURCES], extra_cflags=cflags)


@functools.cache
def load() -> ModuleType | None:
    """The built kernel, or None if the CPU kernels (or this one: OPTISERVE_PACKED_KERNEL=0) are disabled or cannot
    be built here."""
    if "0" in (os.environ.get("OPTISERVE_CPU_KERNELS", "1"), os.environ.get("OPTISERVE_PACKED_KERNEL", "1")):
        return None
    try:
        return build()
    except Exception as e:  # no compiler...: QuantLinear keeps its compute copy
        log.warning("packed CPU kernel unavailable, quantized layers keep an fp32 copy: %s", str(e).splitlines()[0])
        return None


def available(fmt: str) -> bool:
    return fmt in PACKED_FORMATS and load() is not None


@dataclass(frozen=True)
class PackedOperands:
    """What one call needs from a layer's shards, gathered once when the layer is built."""

    code: int
    codes: list[torch.Tensor]
    scales: list[torch.Tensor]
    tensor_scales: list[float]


def operands(fmt: str, shards: list) -> PackedOperands:
    spec = PACKED_FORMATS[fmt]
    codes, scales, tensor_scales = zip(*(spec.operands(s) for s in shards), strict=True)
    return PackedOperands(spec.code, list(codes), list(scales), list(tensor_scales))


def packed_linear(x: torch.Tensor, ops_: PackedOperands, bias: torch.Tensor | None,
                  kernel: ModuleType | None = None) -> torch.Tensor:
    """x [..., K] fp32 (activations already in the format) @ the shards' weights stacked [N, K] (+ bias) -> [..., N]."""
    kernel = kernel or load()
    return kernel.packed_linear(ops_.code, x, ops_.codes, ops_.scales, ops_.tensor_scales, bias, INT4_GROUP_SIZE)
