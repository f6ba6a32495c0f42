"""A model and its formats: what PTQ produces, what a ModelOpt checkpoint loads as, what export writes and what
the engine serves (and swaps between)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .kv_quant import KVFormat
from .model import Transformer
from .weight_formats import WEIGHT_FORMATS, check_format


@dataclass
class WeightSet:
    """A model, the format its linears are in ("none": unquantized) and the KV-cache format it runs with."""

    model: Transformer
    weight_format: str = "none"
    kv: KVFormat = field(default_factory=KVFormat)

    def __post_init__(self) -> None:
        check_format(self.weight_format, WEIGHT_FORMATS, "weight")

    @property
    def kv_format(self) -> str:
        return self.kv.name
