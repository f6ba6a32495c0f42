"""INT8 weights with a per-output-channel scale, INT8 activations with a static per-tensor scale; PTQ smooths
both first (SmoothQuant, exported as `pre_quant_scale`; ModelOpt `W8A8_SQ_PER_CHANNEL`).
GPU: `torch._int_mm` (exact int32 sums), then the activation and channel scales."""

from __future__ import annotations

import torch

from optiserve.kernels.common import divide_exactly
from optiserve.kernels.formats import INT8_MAXBOUND
from optiserve.kernels.int8 import Int8Tensor

from .record import ActivationQuant, CpuKernel, Tensors, WeightFormat, expect_dtype, single_scale_layout

CUBLAS_INT8_MIN_ROWS = 17  # cuBLAS's int8 GEMM (`torch._int_mm` on CUDA) wants more than 16 rows

INT8_ACTIVATIONS = ActivationQuant(
    kind="int8 per tensor",
    scale_from_amax=lambda amax: divide_exactly(amax, INT8_MAXBOUND),
    quantize=lambda x, scale, use_kernel: Int8Tensor.from_float(x, per_channel=False, scale=scale,
                                                                use_kernel=use_kernel),
)


def int8_sums(xq: torch.Tensor, wq: torch.Tensor) -> torch.Tensor:
    """Exact int32 sums xq [M, K] @ wq [N, K].T for int8 codes (`torch._int_mm`)."""
    m = xq.shape[0]
    if xq.is_cuda and m < CUBLAS_INT8_MIN_ROWS:
        xq = torch.nn.functional.pad(xq, (0, 0, 0, CUBLAS_INT8_MIN_ROWS - m))
    return torch._int_mm(xq, wq.t())[:m]  # [M, N]


def int8_matmul(x: torch.Tensor, w: Int8Tensor, input_scale: torch.Tensor, use_kernel: bool | None) -> torch.Tensor:
    xq = INT8_ACTIVATIONS.quantize(x.contiguous(), input_scale, use_kernel)
    sums = int8_sums(xq.qdata, w.qdata).float()  # [M, N], exact
    return (sums * (xq.scale * w.scale)).to(x.dtype)  # per-tensor activation x per-channel weight scale


def int8_from_tensors(t: Tensors, in_features: int, dtype: torch.dtype) -> Int8Tensor:
    w = expect_dtype(t["weight"], torch.int8, "weight")
    return Int8Tensor(w, t["weight_scale"].float().reshape(w.shape[0]).contiguous(), dtype)


def int8_permute_rows(p: Int8Tensor, perm: torch.Tensor) -> Int8Tensor:
    scale = p.scale[perm].contiguous() if p.scale.dim() else p.scale
    return Int8Tensor(p.qdata[perm].contiguous(), scale, p.dtype)


def int8_kernel_operands(s: Int8Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    return s.qdata.view(torch.uint8), s.scale.reshape(-1), 1.0  # codes [N, K], per-channel fp32 [N]


INT8 = WeightFormat(
    name="int8",
    packed_type=Int8Tensor,
    weight_scales="per-channel", group_size=None,
    algorithm="smoothquant",
    quantize=lambda w, scale: Int8Tensor.from_float(w, per_channel=True, scale=scale),
    permute_rows=int8_permute_rows,
    activations=INT8_ACTIVATIONS,
    matmul=int8_matmul,
    cpu_kernel=CpuKernel(2, int8_kernel_operands, gemm_copy=True),
    # ModelOpt writes no config_groups for W8A8_SQ_PER_CHANNEL ("TODO: Handle other quantization algorithms")
    modelopt=single_scale_layout("W8A8_SQ_PER_CHANNEL", int8_from_tensors),
)
