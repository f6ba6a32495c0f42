"""INT4 weights (AWQ): signed codes, two output rows per byte, an fp32 scale per group of 128 along K, activations
unquantized (PTQ's AWQ search scales them, exported as `pre_quant_scale`; ModelOpt `W4A16_AWQ`).
GPU: the fused dequantize-GEMM Triton kernel (`kernels.gemm.int4_linear`)."""

from __future__ import annotations

import torch

from optiserve.kernels.formats import INT4_GROUP_SIZE
from optiserve.kernels.gemm import int4_linear
from optiserve.kernels.int4 import Int4Tensor, unpack_int4_reference

from .record import CpuKernel, Tensors, WeightFormat, expect_dtype, single_scale_layout


def int4_from_tensors(t: Tensors, in_features: int, dtype: torch.dtype) -> Int4Tensor:
    w = expect_dtype(t["weight"], torch.uint8, "weight")
    return Int4Tensor(w, t["weight_scale"].float().contiguous(), (2 * w.shape[0], in_features), dtype,
                      INT4_GROUP_SIZE)


def int4_permute_rows(p: Int4Tensor, perm: torch.Tensor) -> Int4Tensor:
    """Rows are unpacked from their byte pairs, reordered and repacked."""
    nib = (unpack_int4_reference(p.qdata)[perm] & 0x0F).to(torch.uint8)
    return Int4Tensor((nib[0::2] | (nib[1::2] << 4)).contiguous(), p.scale[perm].contiguous(), p.shape, p.dtype,
                      p.group_size)


def int4_kernel_operands(s: Int4Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    assert s.group_size == INT4_GROUP_SIZE, "the INT4 kernel is built for the exported group size"
    return s.qdata, s.scale, 1.0  # codes [N/2, K] (row pairs), fp32 [N, G]


INT4 = WeightFormat(
    name="int4",
    packed_type=Int4Tensor,
    weight_scales="per-group", group_size=INT4_GROUP_SIZE,
    algorithm="awq_lite",
    quantize=lambda w, scale: Int4Tensor.from_float(w, scale=scale),  # scale: AWQ's searched group scales
    permute_rows=int4_permute_rows,
    matmul=lambda x, w, input_scale, use_kernel: int4_linear(x, w, use_kernel=use_kernel),
    cpu_kernel=CpuKernel(1, int4_kernel_operands),
    modelopt=single_scale_layout("W4A16_AWQ", int4_from_tensors,
                                 extra_config={"has_zero_point": False, "pre_quant_scale": True}),
)
