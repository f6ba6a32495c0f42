"""KV-cache formats: how K and V are stored as they are written to the cache (`none`, `fp8`, `nvfp4`), one
`KVCacheFormat` record each (as weight formats have theirs in `weight_formats/`); `KVFormat` is a format with its
per-layer calibration.

`fp8` is ModelOpt's: one calibrated per-tensor scale per layer (`k_scale`/`v_scale` = amax/448).
`nvfp4` stores NVFP4 (blocks of 16 along head_dim, FP8 block scales, the calibrated global scale s2 per layer as
`k_scale`/`v_scale`), encoded for attention rather than with plain amax block scales:
  values  NVFP4(v)                 block scales searched for the least error (`kernels.nvfp4_kv`)
  keys    NVFP4(H (k - m))         m the calibrated mean key of the layer [KV, D], H the normalised Hadamard matrix
Both steps are exact in attention: a query's scores q.(k - m) = q.k - q.m all move by the same constant, which
softmax ignores; and H is orthogonal, so q.k = (H q).(H k): a cache holding rotated keys rotates the query too.
Why: keys have a few channels far larger than the rest (per-channel means and RoPE's slow pairs), so a 16-element
block scaled by its amax leaves the others with one or two codes; centring removes the constant part and the
rotation spreads what is left over all channels.
This engine's cache is a compute copy of the decoded values, so it holds H^T NVFP4(H (k - m)) + m and attention
reads it unchanged. `k_scale`/`v_scale` stay ModelOpt's (from the amax of plain K and V), so an exported checkpoint
means what ModelOpt's does; the mean keys travel beside it (`quantized_checkpoint.KV_MEANS_FILE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import torch

from optiserve.kernels.formats import E2M1_MAX
from optiserve.kernels.fp8 import FP8Tensor
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv

from .weight_formats import check_format
from .weight_formats.fp8 import FP8_ACTIVATIONS


@dataclass(frozen=True)
class KVCacheFormat:
    """One KV-cache format: what it stores, how, and how ModelOpt names it and its scales."""

    name: str
    bytes_per_element: float  # stored bytes per K/V element, block scales included
    encode: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (K or V, the layer's scale) -> decoded values
    kv_cache_quant_algo: str  # hf_quant_config.json `kv_cache_quant_algo` (ModelOpt `_compute_kv_cache_dtype`)
    modelopt_scale_ratio: float  # ModelOpt's `k_scale`/`v_scale` (amax / 448) over our per-layer scale
    centres_keys: bool  # keys centred on calibrated mean keys and rotated before encoding


KV_CACHE_FORMATS = {
    "fp8": KVCacheFormat("fp8", 1.0, lambda t, scale: FP8Tensor.from_float(t, scale).dequantize(), "FP8", 1.0, False),
    # half a byte plus one FP8 block scale per 16 elements; our scale is the NVFP4 global scale amax / (6 * 448)
    "nvfp4": KVCacheFormat("nvfp4", 0.5 + 1 / 16, lambda t, scale: quantize_nvfp4_kv(t, scale).dequantize(), "NVFP4",
                           E2M1_MAX, True),
}
KV_FORMATS = ("none", *KV_CACHE_FORMATS)
KV_BY_ALGO = {f.kv_cache_quant_algo: f for f in KV_CACHE_FORMATS.values()}


@dataclass
class KVFormat:
    """The cache format and its per-layer calibration; `name` "none" stores K and V as computed."""

    name: str = "none"
    k_scales: list[torch.Tensor] | None = None  # per layer: fp8 amax/448, nvfp4 the global scale s2
    v_scales: list[torch.Tensor] | None = None
    k_means: list[torch.Tensor] | None = None  # nvfp4, per layer [KV, D] in our RoPE layout; None: not centred

    def __post_init__(self) -> None:
        check_format(self.name, KV_FORMATS, "KV cache")
        if self.name != "none" and (self.k_scales is None or self.v_scales is None):
            raise ValueError(f"a {self.name} KV cache needs per-layer k/v scales from calibration")

    @property
    def format(self) -> KVCacheFormat | None:
        return KV_CACHE_FORMATS.get(self.name)

    @property
    def bytes_per_element(self) -> float:
        return self.format.bytes_per_element

    def store_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys [B, S, KV, D] as the cache holds them (decoded, back in the keys' own basis)."""
        if self.format is None or not self.format.centres_keys:
            return self._store(k, self.k_scales, layer)
        mean = self.k_means[layer] if self.k_means is not None else torch.zeros((), device=k.device)  # [KV, D]
        rot = hadamard(k.shape[-1], k.device)  # [D, D], symmetric: its own inverse
        rotated = self.format.encode((k.float() - mean) @ rot, self.k_scales[layer])
        return (rotated @ rot + mean).to(k.dtype)

    def store_values(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        """Values [B, S, KV, D] as the cache holds them (decoded)."""
        return self._store(v, self.v_scales, layer)

    def _store(self, t: torch.Tensor, scales: list[torch.Tensor] | None, layer: int) -> torch.Tensor:
        t = t.contiguous()
        return t if self.format is None else self.format.encode(t, scales[layer])


def kv_scale_for(fmt: str, amax: torch.Tensor) -> torch.Tensor:
    """The per-layer `k_scale`/`v_scale`: amax/448 for fp8; for nvfp4 the NVFP4 global scale, formed from ModelOpt's
    `k_scale` = amax/448 as a runtime reading the checkpoint forms it, (amax/448)/6, so export round-trips it exactly
    (amax/2688 in one division can differ in the last bit, and no fp32 value then divides back to it)."""
    return kv_scale_from_modelopt(fmt, FP8_ACTIVATIONS.input_scale(amax))  # ModelOpt's amax / 448, read back


def kv_scale_to_modelopt(fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """Our per-layer KV scale -> ModelOpt's amax / 448 (for NVFP4 ours is amax / (6 * 448): pick the fp32 multiple
    of 6 that divides back to exactly our value when one exists, so a round trip is bit-exact)."""
    scale, ratio = scale.float().reshape(()), KV_CACHE_FORMATS[fmt].modelopt_scale_ratio
    if ratio == 1.0:
        return scale.clone()
    guess = scale * ratio
    candidates = [guess]
    for direction in (torch.tensor(float("inf")), torch.tensor(0.0)):
        c = guess
        for _ in range(4):
            c = torch.nextafter(c, direction)
            candidates.append(c)
    return next((c for c in candidates if torch.equal(kv_scale_from_modelopt(fmt, c), scale)), guess)


def kv_scale_from_modelopt(fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """ModelOpt's `k_scale`/`v_scale` (amax / 448) -> our per-layer KV scale, as a runtime forms it (NVFP4: / 6)."""
    scale, ratio = scale.float().reshape(()), KV_CACHE_FORMATS[fmt].modelopt_scale_ratio
    return scale if ratio == 1.0 else scale / ratio


@cache
def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix [n, n] in fp32 (n a power of two): symmetric and orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"an NVFP4 KV cache needs a power-of-two head_dim for its rotation, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / n**0.5).to(dtype=torch.float32, device=device)
