"""The CPU matmul from packed weights: y = x @ W.T (+ b) for NVFP4 (W4A16 and W4A4), INT4, INT8, FP8 and bf16 shards,
computed by `csrc/packed_linear.cpp` without an fp32 copy of the weight.

The kernel decodes a few weight rows at a time into a tile in cache (bit for bit the values of the format's
dequantize reference in `kernels/`) and multiplies every input row against it in fp32, so a result equals the fp32
product of the dequantized weight and the (quantized) activations up to summation order, and an n-row call gives
each row bit for bit the 1-row result. The formats that quantize activations have them quantized inside the call
(`input_scale`), bit for bit as the format's reference does; INT8 then sums integer code products with AVX512-VNNI
or AVX2 (the GPU path's bits), INT4 W4A8 with those or scalar code (its reference's bits). `fake_quant_activations`
gives those quantized values alone (the compute copy, QAT through `quant.fake_quant_activation`).

Each format's record says whether and how it reaches the kernel (`WeightFormat.cpu_kernel`: the kernel's format
code and how its shards are passed; engine/weight_formats/). The extension is
built apart from `ops` (its own name, same flags and cache rule), and `load()` is None where it cannot be built or
`OPTISERVE_PACKED_KERNEL=0`: `QuantLinear` then keeps its fp32 compute copy.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import os
from dataclasses import dataclass, field
from types import ModuleType

import torch

from optiserve.engine import ops
from optiserve.kernels.formats import INT4_GROUP_SIZE

from .weight_formats import WeightFormat

log = logging.getLogger(__name__)

SOURCES = ["packed_linear.cpp", "packed_layer.cpp", "rowwise.cpp", "activations.cpp", "int8_linear.cpp",
           "int8_amx.cpp", "int4_w4a8.cpp", "attention.cpp", "kv_write.cpp"]


def build(cflags: list[str] = ops.CFLAGS) -> ModuleType:
    """Compile (or load the cached build of) the packed-weight kernel with `cflags`; raises when the build fails."""
    name = ops.build_name(cflags).replace("optiserve_cpu_", "optiserve_packed_")
    return ops.compile_extension(name, SOURCES, cflags)


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


def available(fmt: WeightFormat) -> bool:
    return fmt.cpu_kernel is not None and load() is not None


@dataclass(frozen=True)
class PackedOperands:
    """What one call needs from a layer's shards, gathered once when the layer is built."""

    code: int
    codes: list[torch.Tensor]
    scales: list[torch.Tensor]
    tensor_scales: list[float]
    act_code: int = -1  # how the kernel quantizes the input when the format quantizes activations
    gemm: list[torch.Tensor] = field(default_factory=list)  # `CpuKernel.gemm_copy`: the codes packed for oneDNN

    def __deepcopy__(self, memo: dict) -> PackedOperands:
        """The GEMM copy is packed again from the copied codes (oneDNN's blocked tensors have no storage to copy)."""
        codes, scales = copy.deepcopy(self.codes, memo), copy.deepcopy(self.scales, memo)
        gemm = load().int8_gemm_pack(codes, scales) if self.gemm else []
        return dataclasses.replace(self, codes=codes, scales=scales, gemm=gemm)


def operands(fmt: WeightFormat, shards: list, quantized_input: bool = False) -> PackedOperands:
    """`quantized_input`: the layer quantizes its input (a calibrated input scale), so the kernel may multiply
    integer codes, from many rows on through the format's GEMM copy when it has one."""
    kernel = fmt.cpu_kernel
    codes, scales, tensor_scales = zip(*(kernel.operands(s) for s in shards), strict=True)
    gemm = load().int8_gemm_pack(list(codes), list(scales)) if quantized_input and kernel.gemm_copy else []
    return PackedOperands(kernel.code, list(codes), list(scales), list(tensor_scales), kernel.activation_code, gemm)


BF16_CODE = 4  # plain bf16 weights: no quantized format, what the LM head's `--lm-head-dtype bfloat16` holds


def bf16_operands(w: torch.Tensor) -> PackedOperands:
    """A bf16 weight [N, K] as the kernel reads it: its bytes [N, 2K] (exact: each decodes to its fp32 value)."""
    return PackedOperands(BF16_CODE, [w.contiguous().view(torch.uint8)], [torch.empty(0)], [1.0])


NO_ACTIVATION_QUANT = -1  # `PackedWeight.act_format` of a weight-only layer


def kernel_weight(ops_: PackedOperands, bias: torch.Tensor | None, pre_scale: torch.Tensor | None,
                  input_scale: torch.Tensor | None = None):
    """A layer as the fused layer steps take it (`csrc/packed_layer.cpp`), or None where they cannot: its bias and
    pre-quant scale must be contiguous fp32 tensors on the CPU. `input_scale`: the per-tensor scale of a format
    that quantizes activations."""
    for t in (bias, pre_scale):
        if t is not None and not (t.dtype == torch.float32 and t.is_cpu and t.is_contiguous()):
            return None
    return load().PackedWeight(ops_.code, ops_.codes, ops_.scales, ops_.tensor_scales, bias, pre_scale,
                               INT4_GROUP_SIZE, *_activations(ops_, input_scale), ops_.gemm)


def fake_quant_activations(fmt: WeightFormat, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] fp32 quantized-dequantized as `fmt` quantizes a linear's input, in one kernel pass: the bits of
    the format's reference (`ActivationQuant.fake_quant`)."""
    return load().fake_quant_activations(fmt.cpu_kernel.activation_code, x, float(input_scale))


def packed_linear(x: torch.Tensor, ops_: PackedOperands, bias: torch.Tensor | None,
                  kernel: ModuleType | None = None, input_scale: torch.Tensor | None = None,
                  pre_scale: torch.Tensor | None = None) -> torch.Tensor:
    """(x [..., K] fp32 * pre_scale [K]) @ the shards' weights stacked [N, K] (+ bias) -> [..., N]. With
    `input_scale` (a format that quantizes activations) x is quantized first, in the kernel; INT8 and INT4 W4A8 then
    multiply as exact integer sums (`csrc/int8_linear.cpp`, `csrc/int4_w4a8.cpp`)."""
    kernel = kernel or load()
    return kernel.packed_linear(ops_.code, x, ops_.codes, ops_.scales, ops_.tensor_scales, bias, INT4_GROUP_SIZE,
                                *_activations(ops_, input_scale), pre_scale, ops_.gemm)


def _activations(ops_: PackedOperands, input_scale: torch.Tensor | None) -> tuple[int, float]:
    """The kernel's (act_format, act_scale) for a layer: its format's activation code when it quantizes them."""
    return (NO_ACTIVATION_QUANT, 1.0) if input_scale is None else (ops_.act_code, float(input_scale))
