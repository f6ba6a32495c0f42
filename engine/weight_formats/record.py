"""What a weight format is: one `WeightFormat` record holds everything the engine, PTQ, export and the checkpoint
loader need to know about it, so no code outside `engine/weight_formats/` branches on a format's name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from optiserve.engine.config import ModelLoadError
from optiserve.kernels.fp8 import FP8Tensor
from optiserve.kernels.int4 import Int4Tensor
from optiserve.kernels.int8 import Int8Tensor
from optiserve.kernels.nvfp4 import NVFP4Tensor

PackedWeight = FP8Tensor | NVFP4Tensor | Int8Tensor | Int4Tensor
Tensors = dict[str, torch.Tensor]
WEIGHT_SCALES = ("per-tensor", "per-channel", "per-block", "per-group")
ALGORITHMS = ("max", "smoothquant", "awq_lite")  # PTQ's calibration algorithms (optimize/ptq.py)


@dataclass(frozen=True)
class ActivationQuant:
    """How a format quantizes a linear's input x [..., K]: with a static per-tensor `input_scale` calibrated from
    the input's amax (NVFP4: that is the global scale; its per-16-block scales come from x at run time)."""

    kind: str  # what a reader sees: "fp8 per tensor", ...
    scale_from_amax: Callable[[torch.Tensor], torch.Tensor]  # amax (> 0) -> `input_scale`
    quantize: Callable[[torch.Tensor, torch.Tensor, bool | None], PackedWeight]  # (x, input_scale, use_kernel)

    def input_scale(self, amax: torch.Tensor) -> torch.Tensor:
        """The static scale ModelOpt exports as `input_scale` (an all-zero input still gets a finite one)."""
        return self.scale_from_amax(amax.float().clamp_min(torch.finfo(torch.float32).tiny))

    def fake_quant(self, x: torch.Tensor, input_scale: torch.Tensor, use_kernel: bool | None = None) -> torch.Tensor:
        """Quantize-dequantize x [..., K]: the values the format's matmul sees, in x's dtype."""
        return self.quantize(x.contiguous(), input_scale, use_kernel).dequantize(x.dtype, use_kernel=use_kernel)


@dataclass(frozen=True)
class CpuKernel:
    """How a format reaches the C++ packed kernel (engine/csrc/packed_linear.cpp): its format code there, and one
    shard -> (codes, scales, per-tensor scale) as the kernel reads them."""

    code: int
    operands: Callable[[PackedWeight], tuple[torch.Tensor, torch.Tensor, float]]
    act_code: int | None = None  # the kernel's code for the format's activations, when not `code` (W4A8: 5)
    # Many-row calls with quantized inputs run oneDNN's GEMM on a copy of the codes packed once (INT8 W8A8): a second
    # copy of the weight, counted in the layer's resident bytes.
    gemm_copy: bool = False

    @property
    def activation_code(self) -> int:
        return self.code if self.act_code is None else self.act_code


@dataclass(frozen=True)
class ModelOptLayout:
    """The format in NVIDIA ModelOpt's unified HF export (engine/quantized_checkpoint.py describes the layout)."""

    quant_algo: str  # `quant_algo` in hf_quant_config.json
    tensors: tuple[str, ...]  # safetensors entries per projection besides `input_scale` / `pre_quant_scale`
    to_tensors: Callable[[PackedWeight], Tensors]  # one packed projection -> {name in `tensors`: tensor}
    from_tensors: Callable[[Tensors, int, torch.dtype], PackedWeight]  # (entries, in_features, dtype) -> packed
    config_group: dict | None = None  # config.json `quantization_config.config_groups.group_0` (None: none written)
    extra_config: dict = field(default_factory=dict)  # more hf_quant_config.json `quantization` fields


@dataclass(frozen=True)
class WeightFormat:
    """One quantized weight format: its packed type, scales, activations, ModelOpt layout and matmul per device."""

    name: str
    packed_type: type
    weight_scales: str  # one of WEIGHT_SCALES (NVFP4 also has a per-tensor scale over its block scales)
    group_size: int | None  # weight elements per block/group scale along the input dim; None: not grouped
    quantize: Callable[[torch.Tensor, torch.Tensor | None], PackedWeight]  # (w [N, K], given scale or None)
    permute_rows: Callable[[PackedWeight, torch.Tensor], PackedWeight]  # output rows reordered, scales with them
    modelopt: ModelOptLayout
    # (x [M, K], packed w [N, K], input_scale, use_kernel) -> y [M, N] from the packed codes (GPU, interpreter)
    matmul: Callable[[torch.Tensor, PackedWeight, torch.Tensor | None, bool | None], torch.Tensor]
    algorithm: str = "max"  # what PTQ calibrates with (ModelOpt's names): max | smoothquant | awq_lite
    activations: ActivationQuant | None = None  # None: activations stay unquantized
    tensor_scale_from_amax: Callable[[torch.Tensor], torch.Tensor] | None = None  # per-tensor weight scale
    cpu_kernel: CpuKernel | None = None  # None: the CPU computes from an fp32 copy

    def __post_init__(self) -> None:
        if self.weight_scales not in WEIGHT_SCALES:
            raise ValueError(f"{self.name}: weight_scales must be one of {WEIGHT_SCALES}")
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"{self.name}: algorithm must be one of {ALGORITHMS}")
        if (self.group_size is not None) != (self.weight_scales in ("per-block", "per-group")):
            raise ValueError(f"{self.name}: a group size goes with per-block/per-group scales only")

    @property
    def quantizes_activations(self) -> bool:
        return self.activations is not None

    def quantize_fused(self, shards: list[torch.Tensor]) -> list[PackedWeight]:
        """Pack the shards [rows_i, K] of a fused projection (q/k/v, gate/up). A per-tensor weight scale comes from
        their joint amax, as ModelOpt's exporter does (`preprocess_linear_fusion`), so a runtime that fuses them
        (vLLM) reads one `weight_scale` / `weight_scale_2` that is right for every shard."""
        if self.tensor_scale_from_amax is None or len(shards) == 1:
            return [self.quantize(s.contiguous(), None) for s in shards]
        scale = self.tensor_scale_from_amax(torch.stack([s.abs().amax() for s in shards]).amax().float())
        return [self.quantize(s.contiguous(), scale) for s in shards]


WEIGHT_AND_SCALE = ("weight", "weight_scale")  # a projection's entries when the format has one kind of scale


def weight_and_scale(p: PackedWeight) -> Tensors:
    """`weight` (the codes) and `weight_scale` (fp32) of one projection: FP8, INT8 and INT4."""
    return {"weight": p.qdata, "weight_scale": p.scale.float()}


def single_scale_layout(quant_algo: str, from_tensors: Callable[[Tensors, int, torch.dtype], PackedWeight],
                        **fields) -> ModelOptLayout:
    """The layout of a format with one scale entry (FP8, INT8, INT4): `weight` (codes), `weight_scale` (fp32)."""
    return ModelOptLayout(quant_algo, WEIGHT_AND_SCALE, weight_and_scale, from_tensors, **fields)


def expect_dtype(t: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """`t` contiguous, or a clear load error when a checkpoint stores it in another dtype."""
    if t.dtype != dtype:
        raise ModelLoadError(f"ModelOpt checkpoint: {what} is {t.dtype}, expected {dtype}")
    return t.contiguous()
