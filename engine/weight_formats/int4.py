"""INT4 weights (AWQ): signed codes, two output rows per byte, an fp32 scale per group of 128 along K (PTQ's AWQ
search scales the activations, exported as `pre_quant_scale`).
- `int4` (ModelOpt `W4A16_AWQ`): activations unquantized. GPU: the fused dequantize-GEMM Triton kernel
  (`kernels.gemm.int4_linear`).
- `int4-w4a8`: the same weights, activations quantized to int8 per row and 128-group at run time (as llama.cpp
  multiplies 4-bit weights by q8 blocks, and vLLM's W4A8 int8 schemes), so the CPU sums integer products
  (csrc/int4_w4a8.cpp). ModelOpt has no such format (its `W4A8_AWQ` takes FP8 activations): the checkpoint holds
  `W4A16_AWQ`'s tensors under our own `quant_algo` `W4A8_AWQ_INT8`, and an `input_scale` of 1 (nothing static)."""

from __future__ import annotations

import torch

from optiserve.kernels.formats import INT4_GROUP_SIZE
from optiserve.kernels.gemm import int4_linear
from optiserve.kernels.int4 import Int4Tensor, int4_groups, unpack_int4_reference
from optiserve.kernels.int8 import Int8GroupTensor

from .record import ActivationQuant, CpuKernel, Tensors, WeightFormat, expect_dtype, single_scale_layout


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


INT8_GROUP_ACTIVATIONS = ActivationQuant(
    kind="int8 per row and 128-group, at run time",
    scale_from_amax=torch.ones_like,  # dynamic: no static scale (exported as 1)
    quantize=lambda x, scale, use_kernel: Int8GroupTensor.from_float(x, INT4_GROUP_SIZE, use_kernel=use_kernel),
)


def int4_w4a8_matmul(x: torch.Tensor, w: Int4Tensor, input_scale: torch.Tensor | None,
                     use_kernel: bool | None) -> torch.Tensor:
    """x [..., K] quantized per row and 128-group @ w.T [K, N], as the CPU kernel sums it: per group the exact sum
    of code products (an fp32 matmul of integers below 2^24 is exact), then y = y + sum_g * (x_scale * w_scale)
    over the groups in order."""
    xq = INT8_GROUP_ACTIVATIONS.quantize(x.reshape(-1, x.shape[-1]).float(), input_scale, use_kernel)
    codes = int4_groups(unpack_int4_reference(w.qdata).float())  # [N, G, 128]
    y = torch.zeros(xq.qdata.shape[0], codes.shape[0], device=x.device)
    for g in range(codes.shape[1]):
        sums = xq.qdata[:, g].float() @ codes[:, g].T  # [M, N], exact
        y = y + sums * (xq.scale[:, g, None] * w.scale[None, :, g])
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


INT4_W4A8 = WeightFormat(
    name="int4-w4a8",
    packed_type=Int4Tensor,
    weight_scales="per-group", group_size=INT4_GROUP_SIZE,
    algorithm="awq_lite",
    quantize=INT4.quantize,
    permute_rows=int4_permute_rows,
    activations=INT8_GROUP_ACTIVATIONS,
    matmul=int4_w4a8_matmul,
    cpu_kernel=CpuKernel(1, int4_kernel_operands, act_code=5),
    modelopt=single_scale_layout("W4A8_AWQ_INT8", int4_from_tensors,
                                 extra_config={"has_zero_point": False, "pre_quant_scale": True}),
)
