"""Quantized linear layers for the engine; the format math itself lives in `kernels/`.

A `QuantLinear` keeps the packed weights (what export writes and a GPU computes from) and computes in one of two ways:
  * "copy" (the CPU fallback where the packed kernel cannot be built, and for non-fp32 layers): a compute copy holding
    exactly the format's dequantized values, multiplied by our CPU linear kernel.
  * "packed" (the default): no copy; every forward computes from the packed tensors. On the CPU (fp32) the C++
    kernel of `packed_linear` decodes tiles of weight rows in cache and multiplies them. On CUDA FP8 runs
    `torch._scaled_mm` (FP8 tensor cores, sm89+), INT8 `torch._int_mm` with the scales applied to its int32 sums,
    NVFP4 and INT4 the fused dequantize-GEMM Triton kernels of `kernels.gemm`. Resident bytes are the packed bytes.
Both quantize activations the same way for the formats that quantize them (fp8, int8, nvfp4 W4A4), so the two
modes differ only in summation order.
Fused layers (q/k/v, gate/up) hold one packed tensor per shard, each with its own per-tensor scale, as ModelOpt
exports them; the shards share the input, so they share `input_scale` and `pre_quant_scale`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from optiserve.engine import ops, packed_linear
from optiserve.kernels.formats import FP8_E4M3_MAX, INT8_MAXBOUND
from optiserve.kernels.fp8 import FP8Tensor, fp8_per_tensor_scale
from optiserve.kernels.gemm import int4_linear, nvfp4_linear
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
COMPUTE_MODES = ("copy", "packed")
CUBLAS_INT8_MIN_ROWS = 17  # cuBLAS's int8 GEMM (`torch._int_mm` on CUDA) wants more than 16 rows
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


def quantize_activation(fmt: str, x: torch.Tensor, input_scale: torch.Tensor,
                        use_kernel: bool | None = None) -> PackedWeight:
    """Quantize activations `x` [..., K] with the calibrated per-tensor scale (NVFP4: block scales from x)."""
    x = x.contiguous()
    if fmt == "fp8":
        return FP8Tensor.from_float(x, input_scale, use_kernel=use_kernel)
    if fmt == "int8":
        return Int8Tensor.from_float(x, per_channel=False, scale=input_scale, use_kernel=use_kernel)
    if fmt == "nvfp4":  # block scales from x at run time, global scale calibrated
        return NVFP4Tensor.from_float(x, input_scale, use_kernel=use_kernel)
    raise ValueError(f"{fmt!r} does not quantize activations")


def fake_quant_activation(fmt: str, x: torch.Tensor, input_scale: torch.Tensor,
                          use_kernel: bool | None = None) -> torch.Tensor:
    """Quantize-dequantize activations `x` [..., K] with the calibrated per-tensor scale."""
    return quantize_activation(fmt, x, input_scale, use_kernel).dequantize(x.dtype, use_kernel=use_kernel)


def fp8_mm_available(device: torch.device) -> bool:
    """`torch._scaled_mm` runs on the CPU and on CUDA GPUs with FP8 tensor cores (compute capability 8.9+)."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def int8_matmul(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums xq [M, K] @ wq [N, K].T for int8 codes (`torch._int_mm`)."""
    m = xq.shape[0]
    if xq.is_cuda and m < CUBLAS_INT8_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, CUBLAS_INT8_MIN_ROWS - m))
    return torch._int_mm(xq, wq.t())[:m]  # [M, N]


def packed_matmul(fmt: str, x: torch.Tensor, w: PackedWeight, input_scale: torch.Tensor | None,
                  use_kernel: bool | None = None) -> torch.Tensor:
    """y [M, N] = the format's product of activations x [M, K] and one packed weight w [N, K], computed from the
    packed codes (activations quantized as the format says); y has x's dtype."""
    if fmt == "fp8":
        xq = quantize_activation(fmt, x, input_scale, use_kernel)
        if not fp8_mm_available(x.device):  # an older GPU: same numbers, dequantized in the matmul's dtype
            return xq.dequantize(x.dtype) @ w.dequantize(x.dtype).t()
        return torch._scaled_mm(xq.qdata, w.qdata.t(), scale_a=xq.scale, scale_b=w.scale, out_dtype=x.dtype)
    if fmt == "int8":
        xq = quantize_activation(fmt, x, input_scale, use_kernel)
        sums = int8_matmul(xq.qdata, w.qdata).float()  # [M, N], exact
        return (sums * (xq.scale * w.scale)).to(x.dtype)  # per-tensor activation x per-channel weight scale
    if fmt in ("nvfp4", "nvfp4-w4a16"):
        if fmt == "nvfp4":  # W4A4 on GPUs without FP4 tensor cores: the activations' NVFP4 values, in x's dtype
            x = fake_quant_activation(fmt, x, input_scale, use_kernel)
        return nvfp4_linear(x, w, use_kernel=use_kernel)
    if fmt == "int4":
        return int4_linear(x, w, use_kernel=use_kernel)
    raise ValueError(f"no packed matmul for {fmt!r}")


def cpu_packed_kernel(fmt: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the C++ packed kernel computes a layer: fp32 on the CPU, where it is built."""
    return device.type == "cpu" and dtype == torch.float32 and packed_linear.available(fmt)


def default_compute(fmt: str, device: torch.device, dtype: torch.dtype) -> str:
    """From the packed tensors on a GPU and where the CPU kernel runs; else from the fp32 compute copy."""
    return "packed" if device.type == "cuda" or cpu_packed_kernel(fmt, device, dtype) else "copy"


class QuantLinear(nn.Module):
    """A linear layer in a quantized format: packed shards, computed from a dequantized copy or from the packed
    tensors themselves (`compute`: "copy" or "packed"; default: `default_compute`).
    `use_kernel` is passed to the kernels (None: Triton on CUDA; True runs it through the interpreter on CPU)."""

    def __init__(self, fmt: str, shards: list[PackedWeight], bias: torch.Tensor | None,
                 input_scale: torch.Tensor | None, pre_quant_scale: torch.Tensor | None, dtype: torch.dtype,
                 compute: str | None = None, use_kernel: bool | None = None):
        super().__init__()
        self.fmt, self.shards, self.dtype = fmt, shards, dtype
        self.spec = FORMATS[fmt]
        self.compute = compute or default_compute(fmt, shards[0].qdata.device, dtype)
        check_format(self.compute, COMPUTE_MODES, "compute")
        self.use_kernel = use_kernel
        self.cpu_operands = None  # the packed CPU kernel's view of the shards, when it computes this layer
        if self.compute == "packed" and use_kernel is None and cpu_packed_kernel(fmt, shards[0].qdata.device, dtype):
            self.cpu_operands = packed_linear.operands(fmt, shards)
        self.bias = bias
        self.input_scale = input_scale
        self.pre_quant_scale = pre_quant_scale
        if self.compute == "copy":
            # Same layout as `Linear`: [in, out] as the transpose of row-major [out, in], what `ops.linear`
            # reads fastest.
            self.weight_t = nn.Parameter(self.dequantized().contiguous().t(), requires_grad=False)

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
        """Bytes this process holds for the weight: the compute copy, or the packed tensors."""
        return self.weight_t.nbytes if self.compute == "copy" else self.packed_bytes()

    def bf16_bytes(self) -> int:
        return sum(s.shape[0] * s.shape[1] for s in self.shards) * 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.compute == "packed":
            return self._packed_forward(x)
        if self.spec.quantizes_activations:
            x = fake_quant_activation(self.fmt, x, self.input_scale)
        return ops.linear(x, self.weight_t, self.bias)

    def _packed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cpu_operands is not None and x.dtype == torch.float32 and not x.requires_grad:
            if self.spec.quantizes_activations:
                x = fake_quant_activation(self.fmt, x, self.input_scale)
            return packed_linear.packed_linear(x, self.cpu_operands, self.bias)  # [..., N]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [M, K]
        y = torch.cat([packed_matmul(self.fmt, x2, s, self.input_scale, self.use_kernel) for s in self.shards], -1)
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
