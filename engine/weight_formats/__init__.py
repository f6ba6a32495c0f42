"""Weight formats, one record each (`WeightFormat`, record.py), one file per format family. Everything else
(QuantLinear, PTQ, QAT, export, the checkpoint loader, the CPU packed kernel) asks the record; adding a format
is a new record here."""

from __future__ import annotations

from .fp8 import FP8
from .int4 import INT4, INT4_W4A8
from .int8 import INT8
from .nvfp4 import NVFP4, NVFP4_W4A16
from .record import ActivationQuant, CpuKernel, ModelOptLayout, PackedWeight, WeightFormat

FORMATS: dict[str, WeightFormat] = {f.name: f for f in (FP8, NVFP4, NVFP4_W4A16, INT8, INT4, INT4_W4A8)}
WEIGHT_FORMATS = ("none", *FORMATS)  # what a user may ask for; "none" keeps the weights unquantized
BY_QUANT_ALGO = {f.modelopt.quant_algo: f for f in FORMATS.values()}

__all__ = ["BY_QUANT_ALGO", "FORMATS", "WEIGHT_FORMATS", "ActivationQuant", "CpuKernel", "ModelOptLayout",
           "PackedWeight", "WeightFormat", "check_format", "weight_format"]


def check_format(name: str, allowed: tuple[str, ...], what: str) -> str:
    if name not in allowed:
        raise ValueError(f"unknown {what} format {name!r}; choose from {', '.join(allowed)}")
    return name


def weight_format(fmt: str | WeightFormat) -> WeightFormat:
    """The record of a quantized weight format, by name (a record passes through)."""
    if isinstance(fmt, WeightFormat):
        return fmt
    return FORMATS[check_format(fmt, tuple(FORMATS), "quantized weight")]
