"""PTQ at server start-up: calibrate once, quantize, and cache the result so the next start skips calibration."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from optiserve.engine.kv_quant import KV_FORMATS, KVFormat, kv_scale_for
from optiserve.engine.model import Transformer
from optiserve.engine.quant import PACKED_TYPES, WEIGHT_FORMATS, QuantLinear, check_format
from optiserve.engine.weights import cache_root

from .calibrate import CalibStats, calibrate, quantizable_linears
from .data import default_calib_path, read_texts, token_windows
from .ptq import SMOOTHQUANT_ALPHA, quantize_model, with_layers

log = logging.getLogger(__name__)


@dataclass
class QuantRequest:
    """What the user asked for: formats and calibration set-up."""

    quant: str = "none"
    kv_cache: str = "none"
    calib_data: str | None = None  # None: the calibration slice shipped with the package
    calib_samples: int = 32
    calib_seq_len: int = 512
    smoothquant_alpha: float = SMOOTHQUANT_ALPHA  # ModelOpt's default

    def __post_init__(self) -> None:
        check_format(self.quant, WEIGHT_FORMATS, "weight")
        check_format(self.kv_cache, KV_FORMATS, "KV cache")
        if self.calib_samples < 1 or self.calib_seq_len < 16:
            raise ValueError("calib_samples must be >= 1 and calib_seq_len >= 16")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError("smoothquant_alpha must be in [0, 1]")

    @property
    def calib_path(self) -> Path:
        return Path(self.calib_data) if self.calib_data else default_calib_path()


# Bump when PTQ's math changes, so results cached by an older optiserve are not reused
# (2: SmoothQuant clamps pre_quant_scale and leaves inactive channels unscaled, as ModelOpt does;
#  3: fused q/k/v and gate/up share one per-tensor weight scale;
#  4: calibration records the mean key per layer for the NVFP4 KV cache and a larger, seeded AWQ sample; AWQ clips
#     INT4 groups; the NVFP4 KV global scale is formed as (amax/448)/6).
CACHE_VERSION = 4


@dataclass
class QuantResult:
    model: Transformer
    kv: KVFormat = field(default_factory=KVFormat)


def cache_key(model_dir: Path, req: QuantRequest) -> str:
    """Changes when the model, the formats, the calibration data or its settings, or PTQ's math (CACHE_VERSION)
    change."""
    calib = req.calib_path.resolve()
    stat = calib.stat()
    parts = {"model": str(model_dir.resolve()), **asdict(req), "calib": [str(calib), stat.st_size, stat.st_mtime],
             "version": CACHE_VERSION}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def save_quantized(path: Path, result: QuantResult) -> None:
    layers = {name: {"fmt": m.fmt, "shards": [asdict(s) for s in m.shards], "input_scale": m.input_scale,
                     "pre_quant_scale": m.pre_quant_scale}
              for name, m in result.model.named_modules() if isinstance(m, QuantLinear)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"layers": layers, "kv": asdict(result.kv)}, tmp)
    tmp.rename(path)


def load_quantized(path: Path, model: Transformer) -> QuantResult:
    """Rebuild the quantized model from cached packed shards (no calibration, no search)."""
    # our own cache file (dtypes and dataclass fields), onto the model's device whichever device wrote it
    saved = torch.load(path, map_location=model.embed.weight.device, weights_only=False)
    linears = quantizable_linears(model)
    layers = {}
    for name, entry in saved["layers"].items():
        shards = [PACKED_TYPES[entry["fmt"]](**s) for s in entry["shards"]]
        layers[name] = QuantLinear(entry["fmt"], shards, linears[name].bias, entry["input_scale"],
                                   entry["pre_quant_scale"], model.embed.weight.dtype)
    return QuantResult(with_layers(model, layers), KVFormat(**saved["kv"]))


def calibration_windows(tokenizer, req: QuantRequest) -> list[list[int]]:
    """The token windows PTQ calibrates on: `calib_samples` x `calib_seq_len` tokens of the calibration data."""
    return token_windows(tokenizer, read_texts(req.calib_path, tokenizer), req.calib_seq_len, req.calib_samples)


def calibration_stats(model_dir: Path, model: Transformer, tokenizer, req: QuantRequest) -> CalibStats:
    """Calibration statistics, shared by every format (cached apart from the quantized weights)."""
    path = cache_root() / "ptq" / f"calib-{cache_key(model_dir, replace(req, quant='none', kv_cache='none'))}.pt"
    if path.is_file():
        return torch.load(path, map_location=model.embed.weight.device, weights_only=False)  # our own cache file
    windows = calibration_windows(tokenizer, req)
    log.info("calibrating on %d x %d tokens of %s", len(windows), req.calib_seq_len, req.calib_path)
    stats = calibrate(model, windows)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(stats, path.with_suffix(".tmp"))
    path.with_suffix(".tmp").rename(path)
    return stats


def kv_format_for(name: str, stats: CalibStats) -> KVFormat:
    """The calibrated KV-cache format `name`: scales from the K/V amax, and for NVFP4 the mean keys."""
    if name == "none":
        return KVFormat()
    return KVFormat(name, [kv_scale_for(name, a) for a in stats.k_amax], [kv_scale_for(name, a) for a in stats.v_amax],
                    stats.k_mean if name == "nvfp4" else None)


def prepare_quantized(model_dir: Path, model: Transformer, tokenizer, req: QuantRequest) -> QuantResult:
    """The model quantized as `req` asks (from the cache when the same request ran before)."""
    if req.quant == "none" and req.kv_cache == "none":
        return QuantResult(model)
    path = cache_root() / "ptq" / f"{cache_key(model_dir, req)}.pt"
    if path.is_file():
        log.info("loading calibrated %s / KV %s from %s", req.quant, req.kv_cache, path)
        return load_quantized(path, model)
    stats = calibration_stats(model_dir, model, tokenizer, req)
    qmodel = model if req.quant == "none" else quantize_model(model, req.quant, stats, req.smoothquant_alpha)
    result = QuantResult(qmodel, kv_format_for(req.kv_cache, stats))
    save_quantized(path, result)
    return result
