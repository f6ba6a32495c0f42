"""FP8 (E4M3) weights with one per-tensor scale, FP8 activations with a static per-tensor scale (ModelOpt `FP8`).
GPU: `torch._scaled_mm` (FP8 tensor cores, sm89+; older GPUs dequantize in the matmul's dtype)."""

from __future__ import annotations

import torch

from optiserve.kernels.common import divide_exactly
from optiserve.kernels.formats import FP8_E4M3_MAX
from optiserve.kernels.fp8 import FP8Tensor, fp8_per_tensor_scale

from .record import ActivationQuant, CpuKernel, Tensors, WeightFormat, expect_dtype, single_scale_layout

FP8_ACTIVATIONS = ActivationQuant(
    kind="fp8 per tensor",
    scale_from_amax=lambda amax: divide_exactly(amax, FP8_E4M3_MAX),
    quantize=lambda x, scale, use_kernel: FP8Tensor.from_float(x, scale, use_kernel=use_kernel),
)


def fp8_mm_available(device: torch.device) -> bool:
    """`torch._scaled_mm` runs on the CPU and on CUDA GPUs with FP8 tensor cores (compute capability 8.9+)."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def fp8_matmul(x: torch.Tensor, w: FP8Tensor, input_scale: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
    """y [M, N] = FP8(x [M, K]) @ w [N, K].T in x's dtype."""
    xq = FP8_ACTIVATIONS.quantize(x.contiguous(), input_scale, use_kernel)
    if not fp8_mm_available(x.device):  # an older GPU: same numbers, dequantized in the matmul's dtype
        return xq.dequantize(x.dtype) @ w.dequantize(x.dtype).t()
    return torch._scaled_mm(xq.qdata, w.qdata.t(), scale_a=xq.scale, scale_b=w.scale, out_dtype=x.dtype)


def fp8_from_tensors(t: Tensors, in_features: int, dtype: torch.dtype) -> FP8Tensor:
    return FP8Tensor(expect_dtype(t["weight"], torch.float8_e4m3fn, "weight"), t["weight_scale"].float().reshape(()),
                     dtype)


def fp8_kernel_operands(s: FP8Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:  # E4M3 bits [N, K], scale
    return s.qdata.view(torch.uint8), s.scale, float(s.scale)


FP8 = WeightFormat(
    name="fp8",
    packed_type=FP8Tensor,
    weight_scales="per-tensor", group_size=None,
    quantize=lambda w, scale: FP8Tensor.from_float(w, scale),
    tensor_scale_from_amax=fp8_per_tensor_scale,
    permute_rows=lambda p, perm: FP8Tensor(p.qdata[perm].contiguous(), p.scale, p.dtype),
    activations=FP8_ACTIVATIONS,
    matmul=fp8_matmul,
    cpu_kernel=CpuKernel(3, fp8_kernel_operands),
    modelopt=single_scale_layout(
        "FP8", fp8_from_tensors,
        config_group={"input_activations": {"dynamic": False, "num_bits": 8, "type": "float"},
                      "weights": {"dynamic": False, "num_bits": 8, "type": "float"}, "targets": ["Linear"]},
    ),
)
