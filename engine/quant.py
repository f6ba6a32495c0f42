"""Quantized linear layers and KV-cache formats for the engine; the format math itself lives in `kernels/`.

A `QuantLinear` keeps the packed weights (what export writes and a GPU computes from) and, on the CPU, a compute
copy holding exactly the format's dequantized values: the numerics are the format's, the speed is fp32's.
Activations are quantized on the fly for the formats that quantize them (fp8, int8, nvfp4 W4A4).
Fused layers (q/k/v, gate/up) hold one packed tensor per shard, each with its own per-tensor scale, as ModelOpt
exports them; the shards share the input, so they share `input_scale` and `pre_quant_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optiserve.engine import cpu_kernels
from optiserve.kernels.formats import FP8_E4M3_MAX, INT8_MAXBOUND
from optiserve.kernels.fp8 import FP8Tensor, fp8_per_tensor_scale
from optiserve.kernels.int4 import Int4Tensor
from optiserve.kernels.int8 import Int8Tensor
from optiserve.kernels.nvfp4 import NVFP4Tensor, nvfp4_per_tensor_scale

WEIGHT_FORMATS = ("none", "fp8", "nvfp4", "nvfp4-w4a16", "int8", "int4")
PackedWeight = FP8Tensor | NVFP4Tensor | Int8Tensor | Int4Tensor


@dataclass(frozen=True)
class FormatSpec:
    """What a weight format quantizes besides the weights."""

    name: str
    quantizes_activations: bool


FORMATS = {
    "fp8": FormatSpec("fp8", True),
    "nvfp4": FormatSpec("nvfp4", True),
    "nvfp4-w4a16": FormatSpec("nvfp4-w4a16", False),
    "int8": FormatSpec("int8", True),
    "int4": FormatSpec("int4", False),
}


PER_TENSOR_WEIGHT_SCALE = ("fp8", "nvfp4", "nvfp4-w4a16")  # formats whose weights carry one per-tensor scale
PACKED_TYPES = {"fp8": FP8Tensor, "nvfp4": NVFP4Tensor, "nvfp4-w4a16": NVFP4Tensor, "int8": Int8Tensor,
                "int4": Int4Tensor}


def check_format(name: str, allowed: tuple[str, ...], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} format {name!r}; choose from {', '.join(allowed)}")
    return name


def quantize_weight(fmt: str, w: torch.Tensor, int4_scale: torch.Tensor | None = None) -> PackedWeight:
    """Pack one weight [out, in] in `fmt` (scales from its own amax; int4 may take searched scales)."""
    if fmt == "fp8":
        return FP8Tensor.from_float(w)
    if fmt in ("nvfp4", "nvfp4-w4a16"):
        return NVFP4Tensor.from_float(w)
    if fmt == "int8":
        return Int8Tensor.from_float(w, per_channel=True)
    if fmt == "int4":
        return Int4Tensor.from_float(w, scale=int4_scale)
    raise ValueError(f"no weight quantization for {fmt!r}")


def quantize_fused(fmt: str, shards: list[torch.Tensor]) -> list[PackedWeight]:
    """Pack the shards [rows_i, in] of a fused projection (q/k/v, gate/up). FP8 and NVFP4 give them one per-tensor
    scale from their joint amax, as ModelOpt's exporter does (`preprocess_linear_fusion`), so a runtime that fuses
    them (vLLM) reads one `weight_scale` / `weight_scale_2` that is right for every shard."""
    if fmt not in PER_TENSOR_WEIGHT_SCALE or len(shards) == 1:
        return [quantize_weight(fmt, s.contiguous()) for s in shards]
    amax = torch.stack([s.abs().amax() for s in shards]).amax().float()
    if fmt == "fp8":
        return [FP8Tensor.from_float(s.contiguous(), fp8_per_tensor_scale(amax)) for s in shards]
    return [NVFP4Tensor.from_float(s.contiguous(), nvfp4_per_tensor_scale(amax)) for s in shards]


def input_scale_for(fmt: str, amax: torch.Tensor) -> torch.Tensor | None:
    """The static activation scale ModelOpt exports as `input_scale` (None when activations stay unquantized)."""
    amax = amax.float().clamp_min(torch.finfo(torch.float32).tiny)
    if fmt == "fp8":
        return amax / FP8_E4M3_MAX
    if fmt == "int8":
        return amax / INT8_MAXBOUND
    if fmt == "nvfp4":
        return nvfp4_per_tensor_scale(amax)
    return None


def fake_quant_activation(fmt: str, x: torch.Tensor, input_scale: torch.Tensor) -> torch.Tensor:
    """Quantize-dequantize activations `x` [..., K] with the calibrated per-tensor scale."""
    x = x.contiguous()
    if fmt == "fp8":
        return FP8Tensor.from_float(x, input_scale).dequantize()
    if fmt == "int8":
        return Int8Tensor.from_float(x, per_channel=False, scale=input_scale).dequantize()
    if fmt == "nvfp4":  # block scales from x at run time, global scale calibrated
        return NVFP4Tensor.from_float(x, input_scale).dequantize()
    raise ValueError(f"{fmt!r} does not quantize activations")


class QuantLinear(nn.Module):
    """A linear layer in a quantized format: packed shards + an exact dequantized compute copy [in, out]."""

    def __init__(self, fmt: str, shards: list[PackedWeight], bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, pre_quant_scale: torch.Tensor | None, dtype: torch.dtype):
        super().__init__()
        self.fmt, self.shards = fmt, shards
        self.spec = FORMATS[fmt]
        w = torch.cat([s.dequantize(torch.float32) for s in shards]).to(dtype)  # [out, in]
        # Same layout as `Linear`: [in, out] as the transpose of row-major [out, in], what `cpu_kernels.linear`
        # reads fastest.
        self.weight_t = nn.Parameter(w.contiguous().t(), requires_grad=False)
        self.bias = bias
        self.input_scale = input_scale
        self.pre_quant_scale = pre_quant_scale

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t()

    def packed_bytes(self) -> int:
        """Bytes of the format itself: codes, block/channel scales and per-tensor scales."""
        total = 0
        for s in self.shards:
            total += s.qdata.nbytes + s.scale.nbytes + getattr(s, "per_tensor_scale", torch.empty(0)).nbytes
        return total

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.spec.quantizes_activations:
            x = fake_quant_activation(self.fmt, x, self.input_scale)
        return cpu_kernels.linear(x, self.weight_t, self.bias)
