"""The LM head in a lower precision than the model (`--lm-head-dtype`): bf16, int8 (per-channel) or fp8 (E4M3,
per-tensor) weights, activations left in fp32 (weight-only: one 576-wide state per token costs nothing to keep exact,
and logits feed sampling directly).

On the default model the head is 49152 x 576, the largest matrix: in fp32 it is 113 MB read per decode step, a third
of the step's weight bytes. On the CPU it is computed by the packed kernel (`packed_linear`) straight from its
2- or 1-byte weights; elsewhere, or where the kernel is not built, from a dequantized copy.
The head is formed from the served model's own `lm_head` (the tied embedding's transposed copy); the embedding
lookup keeps its table, and the unquantized master the engine swaps from is left as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from . import ops, packed_linear
from .config import check_lm_head_dtype
from .model import Transformer, with_layers
from .quant import quantize_weight
from .weight_formats import weight_format

KERNEL_FORMAT = {"bfloat16": "bf16", "int8": "int8", "fp8": "fp8"}  # --lm-head-dtype -> packed kernel format


class LowPrecisionLinear(nn.Module):
    """y = x @ W.T with W [V, H] held as bf16 / int8 / fp8 (the LM head; bf16 also the draft head's linears); x and y
    in the model's dtype. What it holds is registered as (frozen) parameters, so `quant.weight_bytes` and `.to()`
    see it like any other weight."""

    def __init__(self, dtype: str, weight: torch.Tensor):
        super().__init__()
        self.dtype_name = check_lm_head_dtype(dtype)
        self.fmt = KERNEL_FORMAT[dtype]
        w = weight.detach().float().contiguous()  # [V, H]
        self.packed = w.to(torch.bfloat16) if self.fmt == "bf16" else quantize_weight(self.fmt, w)
        held = [self.packed] if self.fmt == "bf16" else [self.packed.qdata, self.packed.scale]
        self.held = nn.ParameterList(nn.Parameter(t, requires_grad=False) for t in held)
        self.operands = None
        self.fused = None  # what fused kernel steps take (a draft head's `draft_head_step`), with `operands`
        self.weight_t = None  # the fallback's dequantized copy [H, V], when the kernel does not compute the head
        if w.device.type == "cpu" and packed_linear.load() is not None:
            self.operands = (packed_linear.bf16_operands(self.packed) if self.fmt == "bf16"
                             else packed_linear.operands(weight_format(self.fmt), [self.packed]))
            self.fused = packed_linear.kernel_weight(self.operands, None, None)
        else:
            self.weight_t = nn.Parameter(self.dequantized().t(), requires_grad=False)

    def dequantized(self) -> torch.Tensor:
        """The head's weight values [V, H] in fp32."""
        return self.packed.float() if self.fmt == "bf16" else self.packed.dequantize(torch.float32)

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.operands is not None and x.dtype == torch.float32 and x.is_cpu:
            return packed_linear.packed_linear(x, self.operands, None)  # [..., V]
        weight_t = self.weight_t if self.weight_t is not None else self.dequantized().t()
        return ops.linear(x, weight_t.to(x.dtype), None)


def with_lm_head(model: Transformer, dtype: str) -> Transformer:
    """`model` with its LM head in `dtype` (a copy sharing every other tensor); `model` itself when float32 or
    when its head is already in `dtype`."""
    check_lm_head_dtype(dtype)
    if dtype == "float32" or getattr(model.lm_head, "dtype_name", None) == dtype:
        return model
    head = LowPrecisionLinear(dtype, model.lm_head.weight)
    new = with_layers(model, {})
    new.lm_head = head
    return new
