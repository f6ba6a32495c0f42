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
The cache holds the packed codes (`KVEncoding.encode`, or the fused write kernel in csrc/kv_write.cpp with the same
bits) and attention reads them as they are: the query is rotated once per row and head, scores (H q).NVFP4(H (k - m)),
and q.m, the same for every key of a row, is dropped. Where keys are read as values (SDPA, `KVCache.read`) they are
decoded back to H^T NVFP4(H (k - m)) + m. `k_scale`/`v_scale` stay ModelOpt's (from the amax of plain K and V),
so an exported checkpoint means what ModelOpt's does; the mean keys travel beside it
(`quantized_checkpoint.KV_MEANS_FILE`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

import torch

from optiserve.kernels.common import divide_exactly
from optiserve.kernels.formats import E2M1_MAX, NVFP4_BLOCK_SIZE, NVFP4_KV_SCALE_FACTORS
from optiserve.kernels.fp8 import dequantize_fp8_reference, quantize_fp8_reference
from optiserve.kernels.nvfp4 import dequantize_nvfp4_reference, quantize_nvfp4_reference
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv_reference

from .weight_formats import check_format
from .weight_formats.fp8 import FP8_ACTIVATIONS


@dataclass(frozen=True)
class KVCacheFormat:
    """One KV-cache format: what it stores, how, and how ModelOpt names it and its scales."""

    name: str
    bytes_per_element: float  # stored bytes per K/V element, block scales included
    code_bytes: float  # bytes of codes per element
    scale_block: int  # elements per stored E4M3 block scale; 0: none
    kernel_code: int  # the format's number in the csrc kernels (packed_linear.cpp's enum)
    # (K or V [..., D], the layer's scale, search block scales) -> (codes uint8 [..., D * code_bytes], block scales
    # uint8 [..., D / scale_block] or None): the torch reference of the fused write kernel
    encode: Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]
    decode: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor], torch.Tensor]  # -> fp32 [..., D]
    kv_cache_quant_algo: str  # hf_quant_config.json `kv_cache_quant_algo` (ModelOpt `_compute_kv_cache_dtype`)
    modelopt_scale_ratio: float  # ModelOpt's `k_scale`/`v_scale` (amax / 448) over our per-layer scale
    centres_keys: bool  # keys centred on calibrated mean keys and rotated before encoding


def _fp8_encode(t: torch.Tensor, scale: torch.Tensor, search: bool) -> tuple[torch.Tensor, None]:
    return quantize_fp8_reference(t, scale).view(torch.uint8), None


def _fp8_decode(codes: torch.Tensor, scales: None, scale: torch.Tensor) -> torch.Tensor:
    return dequantize_fp8_reference(codes.view(torch.float8_e4m3fn), scale, torch.float32)


def _nvfp4_encode(t: torch.Tensor, s2: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    codes, scales = (quantize_nvfp4_kv_reference if search else quantize_nvfp4_reference)(t.float(), s2)
    return codes, scales.view(torch.uint8)


def _nvfp4_decode(codes: torch.Tensor, scales: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    return dequantize_nvfp4_reference(codes, scales.view(torch.float8_e4m3fn), s2, 2 * codes.shape[-1], torch.float32)


KV_CACHE_FORMATS = {
    "fp8": KVCacheFormat("fp8", 1.0, 1.0, 0, 3, _fp8_encode, _fp8_decode, "FP8", 1.0, False),
    # half a byte plus one FP8 block scale per 16 elements; our scale is the NVFP4 global scale amax / (6 * 448)
    "nvfp4": KVCacheFormat("nvfp4", 0.5 + 1 / NVFP4_BLOCK_SIZE, 0.5, NVFP4_BLOCK_SIZE, 0, _nvfp4_encode,
                           _nvfp4_decode, "NVFP4", E2M1_MAX, True),
}
KV_FORMATS = ("none", *KV_CACHE_FORMATS)
KV_BY_ALGO = {f.kv_cache_quant_algo: f for f in KV_CACHE_FORMATS.values()}


def kv_bytes_per_element(name: str, dtype: torch.dtype) -> float:
    """Stored bytes per K/V element in KV format `name` ("none": the cache dtype's), block scales included."""
    if name == "none":
        return dtype.itemsize
    if name not in KV_CACHE_FORMATS:
        raise ValueError(f"unknown KV cache format {name!r}; expected one of {', '.join(KV_FORMATS)}")
    return KV_CACHE_FORMATS[name].bytes_per_element


@dataclass(frozen=True)
class KVEncoding:
    """How one layer's K or V is stored: what the fused write kernel and its torch reference (`encode`) both take."""

    format: KVCacheFormat
    scale: torch.Tensor  # 0-dim fp32: the layer's k_scale/v_scale
    mean: torch.Tensor | None  # [KV, D] fp32, subtracted before encoding (NVFP4 keys)
    rotation: torch.Tensor | None  # [D, D] the normalised Hadamard matrix, applied after centring (NVFP4 keys)
    search_scales: bool  # NVFP4: searched block scales (`kernels.nvfp4_kv`); else ModelOpt's amax ones
    scale_value: float  # `scale` as a float, read once (the kernels take it every forward)

    @property
    def factors(self) -> tuple[float, ...]:
        """The NVFP4 block-scale candidates the encoder tries (f = 1.0 alone: ModelOpt's encoding)."""
        return NVFP4_KV_SCALE_FACTORS if self.search_scales else (1.0,)

    def encode(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """K or V [..., KV, D] -> (codes, block scales or None) as the pools hold them."""
        if self.mean is not None:
            t = t.float() - self.mean
        if self.rotation is not None:
            t = t.float() @ self.rotation
        return self.format.encode(t, self.scale, self.search_scales)

    def decode(self, codes: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
        """Stored codes -> fp32 values [..., KV, D] in the keys' own basis (rotated back, mean added)."""
        t = self.format.decode(codes, scales, self.scale)
        if self.rotation is not None:
            t = t @ self.rotation  # symmetric: its own inverse
        return t if self.mean is None else t + self.mean


@dataclass(frozen=True)
class KVPages:
    """One layer's packed K or V pool as the attention kernel reads it."""

    codes: torch.Tensor  # [num_blocks, block_size, KV, D * code_bytes] uint8
    scales: torch.Tensor | None  # [num_blocks, block_size, KV, D / 16] E4M3 bits (NVFP4)
    encoding: KVEncoding


@dataclass
class KVFormat:
    """The cache format and its per-layer calibration; `name` "none" stores K and V as computed."""

    name: str = "none"
    k_scales: list[torch.Tensor] | None = None  # per layer: fp8 amax/448, nvfp4 the global scale s2
    v_scales: list[torch.Tensor] | None = None
    k_means: list[torch.Tensor] | None = None  # nvfp4, per layer [KV, D] in our RoPE layout; None: not centred
    rotate_keys: bool = True  # nvfp4: keys rotated by the Hadamard matrix (False: ModelOpt's plain NVFP4 keys)
    search_scales: bool = True  # nvfp4: searched block scales (False: ModelOpt's amax block scales)
    _encodings: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_format(self.name, KV_FORMATS, "KV cache")
        if self.name != "none" and (self.k_scales is None or self.v_scales is None):
            raise ValueError(f"a {self.name} KV cache needs per-layer k/v scales from calibration")

    @property
    def format(self) -> KVCacheFormat | None:
        return KV_CACHE_FORMATS.get(self.name)

    def encoding(self, layer: int, keys: bool, head_dim: int) -> KVEncoding:
        """How layer `layer`'s keys (or values) are encoded (built once per layer)."""
        key = (layer, keys, head_dim)
        if key not in self._encodings:
            rotates = keys and self.format.centres_keys
            mean = self.k_means[layer].float().contiguous() if rotates and self.k_means is not None else None
            scale = (self.k_scales if keys else self.v_scales)[layer].float().reshape(())
            rotation = hadamard(head_dim, scale.device) if rotates and self.rotate_keys else None
            self._encodings[key] = KVEncoding(self.format, scale, mean, rotation, self.search_scales, float(scale))
        return self._encodings[key]

    def store_keys(self, layer: int, k: torch.Tensor) -> torch.Tensor:
        """Keys [B, S, KV, D] as the cache holds them, decoded (back in the keys' own basis)."""
        return self._store(k, layer, True)

    def store_values(self, layer: int, v: torch.Tensor) -> torch.Tensor:
        """Values [B, S, KV, D] as the cache holds them, decoded."""
        return self._store(v, layer, False)

    def _store(self, t: torch.Tensor, layer: int, keys: bool) -> torch.Tensor:
        if self.format is None:
            return t
        enc = self.encoding(layer, keys, t.shape[-1])
        return enc.decode(*enc.encode(t)).to(t.dtype)


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
    return scale if ratio == 1.0 else divide_exactly(scale, ratio)


@cache
def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The normalised Sylvester-Hadamard matrix [n, n] in fp32 (n a power of two): symmetric and orthogonal."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"an NVFP4 KV cache needs a power-of-two head_dim for its rotation, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return (h / n**0.5).to(dtype=torch.float32, device=device)
