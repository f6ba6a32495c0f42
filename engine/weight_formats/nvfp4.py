"""NVFP4 weights: E2M1 codes in blocks of 16 along K, an FP8 (E4M3) scale per block and an fp32 per-tensor scale
over those. `nvfp4` (ModelOpt `NVFP4`, W4A4) also quantizes activations to NVFP4: block scales from x at run time,
the per-tensor scale calibrated; `nvfp4-w4a16` (`W4A16_NVFP4`) keeps them unquantized.
GPU: the fused dequantize-GEMM Triton kernel (`kernels.gemm.nvfp4_linear`; W4A4 feeds it the activations' NVFP4
values, as GPUs without FP4 tensor cores must)."""

from __future__ import annotations

import torch

from optiserve.kernels.formats import NVFP4_BLOCK_SIZE
from optiserve.kernels.gemm import nvfp4_linear
from optiserve.kernels.nvfp4 import NVFP4Tensor, nvfp4_per_tensor_scale

from .record import ActivationQuant, CpuKernel, ModelOptLayout, Tensors, WeightFormat, expect_dtype

NVFP4_ACTIVATIONS = ActivationQuant(
    kind="nvfp4 per 16-element block (dynamic), global scale per tensor (static)",
    scale_from_amax=nvfp4_per_tensor_scale,
    quantize=lambda x, scale, use_kernel: NVFP4Tensor.from_float(x, scale, use_kernel=use_kernel),
)


def w4a16_matmul(x: torch.Tensor, w: NVFP4Tensor, input_scale: None, use_kernel: bool | None) -> torch.Tensor:
    return nvfp4_linear(x, w, use_kernel=use_kernel)  # [M, N]


def w4a4_matmul(x: torch.Tensor, w: NVFP4Tensor, input_scale: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
    return nvfp4_linear(NVFP4_ACTIVATIONS.fake_quant(x, input_scale, use_kernel), w, use_kernel=use_kernel)


def nvfp4_to_tensors(p: NVFP4Tensor) -> Tensors:
    return {"weight": p.qdata, "weight_scale": p.scale, "weight_scale_2": p.per_tensor_scale.float().reshape(())}


def nvfp4_from_tensors(t: Tensors, in_features: int, dtype: torch.dtype) -> NVFP4Tensor:
    w = expect_dtype(t["weight"], torch.uint8, "weight")
    s = expect_dtype(t["weight_scale"], torch.float8_e4m3fn, "weight_scale")
    return NVFP4Tensor(w, s, t["weight_scale_2"].float().reshape(()), (w.shape[0], in_features), dtype)


def nvfp4_permute_rows(p: NVFP4Tensor, perm: torch.Tensor) -> NVFP4Tensor:
    return NVFP4Tensor(p.qdata[perm].contiguous(), p.scale[perm].contiguous(), p.per_tensor_scale, p.shape, p.dtype,
                       p.block_size)


def nvfp4_kernel_operands(s: NVFP4Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    return s.qdata, s.scale.view(torch.uint8), float(s.per_tensor_scale)  # codes [N, Kp/2], E4M3 bits [N, Kp/16]


def nvfp4_format(name: str, quant_algo: str, activations: ActivationQuant | None) -> WeightFormat:
    """The NVFP4 weight format; `activations` says whether inputs are quantized too (W4A4) or not (W4A16)."""
    weights = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": NVFP4_BLOCK_SIZE}
    group = {"weights": weights, "targets": ["Linear"]}
    if activations is not None:
        group = {"input_activations": dict(weights), **group}
    return WeightFormat(
        name=name,
        packed_type=NVFP4Tensor,
        weight_scales="per-block", group_size=NVFP4_BLOCK_SIZE,
        quantize=lambda w, scale: NVFP4Tensor.from_float(w, scale),
        tensor_scale_from_amax=nvfp4_per_tensor_scale,
        permute_rows=nvfp4_permute_rows,
        activations=activations,
        matmul=w4a4_matmul if activations is not None else w4a16_matmul,
        cpu_kernel=CpuKernel(0, nvfp4_kernel_operands),
        modelopt=ModelOptLayout(quant_algo=quant_algo, tensors=("weight", "weight_scale", "weight_scale_2"),
                                to_tensors=nvfp4_to_tensors, from_tensors=nvfp4_from_tensors, config_group=group),
    )


NVFP4 = nvfp4_format("nvfp4", "NVFP4", NVFP4_ACTIVATIONS)
NVFP4_W4A16 = nvfp4_format("nvfp4-w4a16", "W4A16_NVFP4", None)
