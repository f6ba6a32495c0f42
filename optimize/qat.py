"""Quantization-aware training (QAT) and distillation (QAD), starting from the PTQ result.

Each quantizable linear becomes a `QATLinear`: fp32 master weights (PTQ's planned, possibly smoothed weights), and
in the forward pass the very quantize-dequantize PTQ and `QuantLinear` use (`quantize_fused`,
`fake_quant_activation`, i.e. the kernels' reference math), wrapped in a straight-through estimator: the forward
sees quantized values, the backward treats quantization as identity, so fp32 gradients reach the master weights.
Static input scales, SmoothQuant/AWQ pre-quant scales and the fused weight scales' recipe stay PTQ's; weight
scales follow the trained weights (as PTQ derives them from the weights). Export packs the trained weights with
`ptq.quant_linear` into the same ModelOpt checkpoint `optiserve quantize` writes.
QAT's loss is next-token cross entropy on the data; QAD's is `distill.distill_loss_fn` against the unquantized model.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from optiserve.engine.model import RMSNorm, Transformer
from optiserve.engine.quant import fake_quant_activation, input_scale_for, quantize_fused
from optiserve.engine.weight_formats import FORMATS, weight_format
from optiserve.engine.weight_set import WeightSet

from .calibrate import CalibStats, quantizable_linears
from .distill import DistillLoss, distill_loss_fn, with_layer_map
from .ptq import SMOOTHQUANT_ALPHA, LinearPlan, plan_model, quant_linear, with_layers
from .ptq_pipeline import QuantRequest, calibration_stats
from .train import (
    EVAL_WINDOW,
    LossFn,
    TrainConfig,
    causal_inputs,
    data_loss,
    init_distributed,
    main_first,
    report,
    train,
    train_logits,
)


def ste(x: torch.Tensor, quantized: torch.Tensor) -> torch.Tensor:
    """Forward: `quantized`; backward: identity to `x` (the straight-through estimator)."""
    return x + (quantized - x).detach()


class QATLinear(nn.Module):
    """A linear layer trained through fake quantization in format `fmt`; `weight` [out, in] is fp32."""

    def __init__(self, fmt: str, plan: LinearPlan, bias: torch.Tensor | None):
        super().__init__()
        self.fmt, self.format = fmt, weight_format(fmt)
        self.sizes = [s.shape[0] for s in plan.shards]  # per-shard (q/k/v, gate/up) weight scales, as exported
        self.weight = nn.Parameter(torch.cat(plan.shards).float().clone())  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone())
        self.input_amax = plan.input_amax
        self.input_scale = input_scale_for(fmt, plan.input_amax)  # None where activations stay unquantized
        self.pre_quant_scale = plan.pre_quant_scale

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """The weight [out, in] as the format stores it (PTQ's `quantize_fused` over the shards)."""
        shards = quantize_fused(self.fmt, list(self.weight.detach().split(self.sizes)))
        return torch.cat([s.dequantize(torch.float32) for s in shards])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale
        if self.format.quantizes_activations:
            with torch.no_grad():
                xq = fake_quant_activation(self.fmt, x.detach(), self.input_scale)
            x = ste(x, xq)
        return F.linear(x, ste(self.weight, self.quantized_weight()), self.bias)

    def plan(self) -> LinearPlan:
        """The trained layer as a PTQ plan, ready for `ptq.quant_linear`."""
        return LinearPlan(list(self.weight.detach().split(self.sizes)), self.input_amax, self.pre_quant_scale)


def qat_model(model: Transformer, fmt: str, stats: CalibStats,
              smoothquant_alpha: float = SMOOTHQUANT_ALPHA) -> Transformer:
    """A deep copy of `model` whose quantizable linears are `QATLinear`s initialised from PTQ; `model` is left
    as is (it stays the teacher)."""
    if fmt not in FORMATS:
        raise ValueError(f"QAT needs a quantized weight format, got {fmt!r}")
    student = copy.deepcopy(model)
    linears = quantizable_linears(student)
    for name, plan in plan_model(student, fmt, stats, smoothquant_alpha).items():
        parent, child = name.rsplit(".", 1)
        setattr(student.get_submodule(parent), child, QATLinear(fmt, plan, linears[name].bias))
    return student


def trainable(student: Transformer) -> dict[str, nn.Parameter]:
    """What QAT trains: the quantized linears' weights and biases and the RMSNorm gains; the embeddings (tied to
    the unquantized LM head) stay."""
    params = {f"{name}.{n}": p for name, m in student.named_modules() if isinstance(m, QATLinear | RMSNorm)
              for n, p in m.named_parameters(recurse=False)}
    for p in params.values():
        p.requires_grad_(True)
    return params


def to_quant_result(student: Transformer) -> WeightSet:
    """The trained student with every `QATLinear` packed as PTQ packs (no KV-cache quantization)."""
    dtype = student.embed.weight.dtype
    student.requires_grad_(False)
    qat = {n: m for n, m in student.named_modules() if isinstance(m, QATLinear)}
    (fmt,) = {m.fmt for m in qat.values()} or {"none"}  # QAT trains one format
    layers = {n: quant_linear(m.fmt, m.plan(), m.bias, dtype) for n, m in qat.items()}
    return WeightSet(with_layers(student, layers), fmt)


def qat_loss_fn(student: Transformer) -> LossFn:
    """Next-token cross entropy of the fake-quantized student on the data."""

    def loss_fn(tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        positions, mask = causal_inputs(tokens, student)
        x, _ = student.hidden_states(tokens, positions, None, mask)
        return data_loss(train_logits(student, x), tokens), {}

    return loss_fn


def run_qat(model: str, req: QuantRequest, data: list[str], output: str, train_cfg: TrainConfig,
            distill: DistillLoss | None = None, eval_data: str | None = None, eval_windows: int = 40,
            json_path: str | None = None) -> dict | None:
    """`optiserve qat` (distill None) or `optiserve qad` (the distillation loss): train, export, report."""
    from transformers import AutoTokenizer

    from optiserve.engine.quantized_checkpoint import is_modelopt_checkpoint
    from optiserve.engine.weights import load_model, resolve_model_dir

    from .data import training_windows
    from .export import export_checkpoint

    if req.kv_cache != "none":
        raise ValueError("QAT/QAD train weight formats; quantize the KV cache at serving time (--kv-cache)")
    d = init_distributed()
    model_dir = main_first(d, lambda: resolve_model_dir(model))
    if is_modelopt_checkpoint(model_dir):
        raise ValueError(f"{model_dir} is already quantized: start QAT from the unquantized checkpoint")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    windows = training_windows(tokenizer, data, train_cfg.seq_len)
    teacher = load_model(model_dir, max(train_cfg.seq_len, req.calib_seq_len, EVAL_WINDOW), torch.float32)
    stats = main_first(d, lambda: calibration_stats(model_dir, teacher, tokenizer, req))
    student = qat_model(teacher, req.quant, stats, req.smoothquant_alpha)
    if distill is not None:
        distill = with_layer_map(distill, student, teacher)
    loss_fn = qat_loss_fn(student) if distill is None else distill_loss_fn(student, teacher, distill)
    command = "qat" if distill is None else "qad"
    summary = train(trainable(student), loss_fn, windows, train_cfg, Path(output), d, command)
    if not d.main:
        return None
    out = export_checkpoint(model_dir, to_quant_result(student), Path(output))
    extra = {"command": command, "model": model, "quant": req.quant, "output": str(out), "data": data,
             "train": asdict(train_cfg), **({"loss": asdict(distill)} if distill else {})}
    return report(summary, extra, teacher, eval_data, eval_windows, tokenizer, json_path)
