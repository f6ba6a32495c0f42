"""Post-training quantization: from calibration statistics to a model whose linears are `QuantLinear`s.

- fp8 / nvfp4 / nvfp4-w4a16: max calibration (weights from their own amax — fused q/k/v and gate/up from their
  joint amax, as ModelOpt exports them — activations from calibrated amax).
- int8: SmoothQuant as ModelOpt's `INT8_SMOOTHQUANT_CFG` does it — every linear, per input channel
  s = amax_x^alpha / amax_w^(1-alpha) (alpha 1.0 by default, ModelOpt's), weights W*s, inputs x/s (exported as
  `pre_quant_scale` = 1/s), then INT8 per-channel weights and a static per-tensor input scale.
- int4: AWQ (`awq.py`) — per layer, a grid search over alpha of s = mean|x|^alpha / mean|w|^(1-alpha) that
  minimises the output error of the INT4-quantized layer on sampled calibration inputs (ModelOpt's awq_lite idea),
  then a per-group search of a clipped amax (its awq_clip idea); the group scales are the clipped amax / 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm import tqdm

from optiserve.engine.layout import layer_linear
from optiserve.engine.model import Transformer, with_layers
from optiserve.engine.quant import QuantLinear, input_scale_for, quantize_fused, quantize_weight
from optiserve.engine.weight_formats import weight_format
from optiserve.kernels.int4 import int4_scale_from_amax

from .awq import awq
from .calibrate import CalibStats, InputStats, quantizable_linears

SMOOTHQUANT_ALPHA = 1.0  # ModelOpt's `SmoothQuantCalibConfig.alpha` default, what INT8_SMOOTHQUANT_CFG uses
SMOOTH_SCALE_MIN, SMOOTH_SCALE_MAX = 1e-4, 1e4  # ModelOpt clamps pre_quant_scale (1/s) to this range
INACTIVE_AMAX = 2.0**-31  # input channels at most this large get s = 1 (ModelOpt's zero-channel mask)


@dataclass
class LinearPlan:
    """What PTQ decided for one (possibly fused) linear layer."""

    shards: list[torch.Tensor]  # float weights [rows_i, in] as they will be quantized (smoothed if so)
    input_amax: torch.Tensor
    pre_quant_scale: torch.Tensor | None = None
    int4_scales: list[torch.Tensor] | None = None  # per shard [rows_i, G]: searched (clipped) INT4 group scales


def shard_sizes(model: Transformer, name: str) -> list[int]:
    """Row counts of the HF projections fused into module `name` (q/k/v, gate/up; engine/layout.py)."""
    return layer_linear(name).rows(model.cfg)


def smooth_scale(stats: InputStats, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel s [in] (weights are multiplied by s, inputs divided), as ModelOpt's
    `smoothquant` computes it: 1 for inactive channels, and 1/s kept within [1e-4, 1e4]."""
    x_amax = stats.channel_amax.float()
    s = x_amax.pow(alpha) / w.abs().amax(0).pow(1 - alpha)
    s = torch.where(x_amax <= INACTIVE_AMAX, torch.ones_like(s), s)
    return s.clamp(1 / SMOOTH_SCALE_MAX, 1 / SMOOTH_SCALE_MIN)


def plan_linear(fmt: str, name: str, w: torch.Tensor, stats: InputStats, sizes: list[int],
                smoothquant_alpha: float) -> LinearPlan:
    """Decide smoothing, input range and (int4) the searched group scales for one linear; `w` is [out, in] fp32."""
    int4_scales, algorithm = None, weight_format(fmt).algorithm
    if algorithm == "smoothquant":
        s = smooth_scale(stats, w, smoothquant_alpha)
    elif algorithm == "awq_lite":
        found = awq(stats, w)
        s, int4_scales = found.scale, list(int4_scale_from_amax(found.group_amax).split(sizes))
    else:
        return LinearPlan(list(w.split(sizes)), stats.amax)
    smoothed_amax = (stats.channel_amax / s).amax()
    return LinearPlan(list((w * s).split(sizes)), smoothed_amax, pre_quant_scale=1.0 / s, int4_scales=int4_scales)


def plan_model(model: Transformer, fmt: str, stats: CalibStats,
               smoothquant_alpha: float = SMOOTHQUANT_ALPHA) -> dict[str, LinearPlan]:
    """PTQ's decision (smoothing, input range) for every quantizable linear of `model`, by module name."""
    plans = {}
    for name, linear in tqdm(quantizable_linears(model).items(), desc=f"quantize {fmt}", unit="linear"):
        w = linear.weight.float()  # [out, in]
        plans[name] = plan_linear(fmt, name, w, stats.linears[name], shard_sizes(model, name), smoothquant_alpha)
    return plans


def quant_linear(fmt: str, plan: LinearPlan, bias: torch.Tensor | None, dtype: torch.dtype) -> QuantLinear:
    """Pack a planned linear in `fmt` (PTQ's last step, and QAT's export)."""
    if plan.int4_scales is not None:  # searched group scales; shards of int4 share no scale, so no fusing to do
        shards = [quantize_weight(fmt, w.contiguous(), sc) for w, sc in zip(plan.shards, plan.int4_scales, strict=True)]
    else:
        shards = quantize_fused(fmt, plan.shards)
    input_scale = input_scale_for(fmt, plan.input_amax)  # None where activations stay unquantized
    return QuantLinear(fmt, shards, bias, input_scale, plan.pre_quant_scale, dtype)


def quantize_model(model: Transformer, fmt: str, stats: CalibStats,
                   smoothquant_alpha: float = SMOOTHQUANT_ALPHA) -> Transformer:
    """A new model whose linears (all but the LM head) are `fmt`; the input model and its tensors are untouched
    (the two share embeddings, norms and the LM head)."""
    dtype = model.embed.weight.dtype
    linears = quantizable_linears(model)
    plans = plan_model(model, fmt, stats, smoothquant_alpha)
    return with_layers(model, {n: quant_linear(fmt, p, linears[n].bias, dtype) for n, p in plans.items()})
