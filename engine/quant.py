"""Quantized linear layers for the engine; what each format is (packed type, scales, activations, matmul per
device) is its record in `engine/weight_formats/`, the number formats themselves are in `kernels/`.

A `QuantLinear` keeps the packed weights (what export writes and a GPU computes from) and computes in one of two ways:
  * "copy" (the CPU fallback where the packed kernel cannot be built, and for non-fp32 layers): a compute copy holding
    exactly the format's dequantized values, multiplied by our CPU linear kernel.
  * "packed" (the default): no copy; every forward computes from the packed tensors. On the CPU (fp32) the C++
    kernel of `packed_linear` decodes tiles of weight rows in cache and multiplies them; on CUDA the format's
    `matmul` runs (FP8 tensor cores, `torch._int_mm`, or a fused dequantize-GEMM). Resident bytes are the packed
    bytes.
Both quantize activations the same way for the formats that quantize them (fp8, int8, nvfp4 W4A4), so the two
modes differ only in summation order.
Fused layers (q/k/v, gate/up) hold one packed tensor per shard, each with its own per-tensor scale, as ModelOpt
exports them; the shards share the input, so they share `input_scale` and `pre_quant_scale`.
"""

from __future__ import annotations

import torch
from torch import nn

from optiserve.engine import ops, packed_linear

from .weight_formats import WEIGHT_FORMATS, PackedWeight, WeightFormat, check_format, weight_format

__all__ = ["WEIGHT_FORMATS", "QuantLinear", "check_format", "fake_quant_activation", "input_scale_for",
           "quantize_fused", "quantize_weight", "weight_bytes"]

COMPUTE_MODES = ("copy", "packed")


def quantize_weight(fmt: str | WeightFormat, w: torch.Tensor, scale: torch.Tensor | None = None) -> PackedWeight:
    """Pack one weight [out, in] in `fmt`: scales from its own amax, or `scale` (the per-tensor scale of FP8/NVFP4,
    INT4's searched group scales)."""
    return weight_format(fmt).quantize(w, scale)


def quantize_fused(fmt: str | WeightFormat, shards: list[torch.Tensor]) -> list[PackedWeight]:
    """Pack the shards [rows_i, in] of a fused projection (`WeightFormat.quantize_fused`)."""
    return weight_format(fmt).quantize_fused(shards)


def input_scale_for(fmt: str | WeightFormat, amax: torch.Tensor) -> torch.Tensor | None:
    """The static activation scale ModelOpt exports as `input_scale` (None when activations stay unquantized)."""
    acts = weight_format(fmt).activations
    return None if acts is None else acts.input_scale(amax)


def fake_quant_activation(fmt: str | WeightFormat, x: torch.Tensor, input_scale: torch.Tensor,
                          use_kernel: bool | None = None) -> torch.Tensor:
    """Quantize-dequantize activations `x` [..., K] with the calibrated per-tensor scale: in one pass of the packed
    CPU kernel where it runs (fp32 on the CPU, no autograd, `use_kernel` unset), else the format's reference (the
    same bits; `use_kernel` is its Triton switch)."""
    fmt = weight_format(fmt)
    if use_kernel is None and cpu_packed_kernel(fmt, x.device, x.dtype) and not (
            torch.is_grad_enabled() and x.requires_grad):
        return packed_linear.fake_quant_activations(fmt, x, input_scale)
    return fmt.activations.fake_quant(x, input_scale, use_kernel)


def cpu_packed_kernel(fmt: WeightFormat, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ packed kernel computes a layer: fp32 on the CPU, where it is built."""
    return device.type == "cpu" and dtype == torch.float32 and packed_linear.available(fmt)


def default_compute(fmt: WeightFormat, device: torch.device, dtype: torch.dtype) -> str:
    """From the packed tensors on a GPU and where the CPU kernel runs; else from the fp32 compute copy."""
    return "packed" if device.type == "cuda" or cpu_packed_kernel(fmt, device, dtype) else "copy"


class QuantLinear(nn.Module):
    """A linear layer in a quantized format: packed shards, computed from a dequantized copy or from the packed
    tensors themselves (`compute`: "copy" or "packed"; default: `default_compute`).
    `use_kernel` is passed to the kernels (None: Triton on CUDA; True runs it through the interpreter on CPU)."""

    def __init__(self, fmt: str | WeightFormat, shards: list[PackedWeight], bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, pre_quant_scale: torch.Tensor | None, dtype: torch.dtype,
                 compute: str | None = None, use_kernel: bool | None = None):
        super().__init__()
        self.format = weight_format(fmt)
        self.fmt, self.shards, self.dtype = self.format.name, shards, dtype
        device = shards[0].qdata.device
        self.compute = compute or default_compute(self.format, device, dtype)
        check_format(self.compute, COMPUTE_MODES, "compute")
        self.use_kernel = use_kernel
        self.bias = bias
        self.input_scale = input_scale
        self.pre_quant_scale = pre_quant_scale
        self.cpu_operands = None  # the packed CPU kernel's view of the shards, when it computes this layer
        if self.compute == "packed" and use_kernel is None and cpu_packed_kernel(self.format, device, dtype):
            self.cpu_operands = packed_linear.operands(self.format, shards, self._act_scale() is not None)
        self._build_fused()
        if self.compute == "copy":
            # Same layout as `Linear`: [in, out] as the transpose of row-major [out, in], what `ops.linear`
            # reads fastest.
            self.weight_t = nn.Parameter(self.dequantized().contiguous().t(), requires_grad=False)

    def _build_fused(self) -> None:
        """What the fused decoder-layer steps compute this layer from (layers on the packed kernel): a view of
        `cpu_operands`, sharing its tensors and INT8's GEMM copy."""
        self.fused = None
        if self.cpu_operands is not None:
            self.fused = packed_linear.kernel_weight(self.cpu_operands, self.bias, self.pre_quant_scale,
                                                     self._act_scale())

    def __getstate__(self) -> dict:
        # A copy (`model.with_layers`) or pickle rebuilds `fused` from its own operands: copied on its own, it would
        # pack INT8's GEMM copy a second time.
        return {**self.__dict__, "fused": None}

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._build_fused()

    def _act_scale(self) -> torch.Tensor | None:
        """The scale the kernel quantizes this layer's input with; None for a weight-only format."""
        return None if self.format.activations is None else self.input_scale

    def dequantized(self) -> torch.Tensor:
        """The format's weight values [out, in] in the layer's dtype."""
        return torch.cat([s.dequantize(torch.float32) for s in self.shards]).to(self.dtype)

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_t.t() if self.compute == "copy" else self.dequantized()

    def packed_bytes(self) -> int:
        """Bytes of the format itself: codes, block/channel scales and per-tensor scales."""
        total = 0
        for s in self.shards:
            total += s.qdata.nbytes + s.scale.nbytes + getattr(s, "per_tensor_scale", torch.empty(0)).nbytes
        return total

    def resident_bytes(self) -> int:
        """Bytes this process holds for the weight: the compute copy, or the packed tensors (and their GEMM copy)."""
        if self.compute == "copy":
            return self.weight_t.nbytes
        gemm = self.cpu_operands.gemm if self.cpu_operands else []
        return self.packed_bytes() + sum(t.nbytes for t in gemm)

    def bf16_bytes(self) -> int:
        return sum(s.shape[0] * s.shape[1] for s in self.shards) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.compute == "packed":
            return self._packed_forward(x)
        if self.format.activations is not None:
            x = fake_quant_activation(self.format, x, self.input_scale)
        return ops.linear(x, self.weight_t, self.bias)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_operands is not None and x.dtype == torch.float32 and not x.requires_grad:
            return packed_linear.packed_linear(x, self.cpu_operands, self.bias, input_scale=self._act_scale())
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
        y = torch.cat([self.format.matmul(x2, s, self.input_scale, self.use_kernel) for s in self.shards], -1)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])  # [..., N]


def weight_bytes(model: nn.Module) -> tuple[int, int]:
    """(format bytes, resident bytes) of a model's weights: quantized linears count as packed in the first, as held
    (compute copy or packed tensors) in the second; everything else as its parameters."""
    params = sum(p.nbytes for p in model.parameters())  # holds the compute copies, not packed shards
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    packed = sum(m.packed_bytes() for m in layers)
    copies = sum(m.resident_bytes() for m in layers if m.compute == "copy")
    return params - copies + packed, params - copies + sum(m.resident_bytes() for m in layers)
