"""The PTQ pipeline, as the server start-up, `optiserve quantize`, `eval`, QAT and the admin swap run it: calibrate
(statistics cached), quantize, and cache the result as an export directory so the next run skips both."""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from functools import cache
from pathlib import Path

import torch

from optiserve.engine.cache_store import cache_root, file_identity, read_entry, write_entry
from optiserve.engine.kv_quant import KV_CACHE_FORMATS, KV_FORMATS, KVFormat, kv_scale_for
from optiserve.engine.model import Transformer
from optiserve.engine.quantized_checkpoint import load_quantized_layers
from optiserve.engine.weight_formats import WEIGHT_FORMATS, check_format
from optiserve.engine.weight_set import WeightSet

from .calibrate import CalibStats, calibrate, load_stats, save_stats
from .data import default_calib_path, read_texts, token_windows
from .export import export_checkpoint
from .ptq import SMOOTHQUANT_ALPHA, quantize_model

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


# The code whose output the cache holds: an edit to any of it (or another torch) makes new keys, so results an
# older optiserve cached are never reused.
FINGERPRINTED_MODULES = ("optiserve.engine.quant", "optiserve.engine.kv_quant", "optiserve.engine.layout",
                         "optiserve.engine.quantized_checkpoint",
                         "optiserve.optimize.awq", "optiserve.optimize.calibrate", "optiserve.optimize.export",
                         "optiserve.optimize.ptq", "optiserve.optimize.ptq_pipeline")
FINGERPRINTED_PACKAGES = ("optiserve.kernels", "optiserve.engine.weight_formats")  # every module in them


@cache
def code_fingerprint() -> str:
    files = [Path(importlib.import_module(m).__file__) for m in FINGERPRINTED_MODULES]
    for pkg in FINGERPRINTED_PACKAGES:
        files += sorted(Path(importlib.import_module(pkg).__file__).parent.glob("*.py"))
    digest = hashlib.sha256(torch.__version__.encode())
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()[:16]


def cache_key(model_dir: Path, model: Transformer, req: QuantRequest) -> str:
    """Changes when the model's files, the dtype or device it runs in, the formats, the calibration data or its
    settings, or PTQ's code change."""
    model_files = sorted([*model_dir.glob("*.safetensors"), model_dir / "config.json"])
    weight = model.embed.weight
    parts = {"model": [file_identity(f) for f in model_files], "dtype": str(weight.dtype),
             "device": weight.device.type, **asdict(req), "calib": file_identity(req.calib_path),
             "code": code_fingerprint()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def calibration_windows(tokenizer, req: QuantRequest) -> list[list[int]]:
    """The token windows PTQ calibrates on: `calib_samples` x `calib_seq_len` tokens of the calibration data."""
    return token_windows(tokenizer, read_texts(req.calib_path, tokenizer), req.calib_seq_len, req.calib_samples)


def calibration_stats(model_dir: Path, model: Transformer, tokenizer, req: QuantRequest) -> CalibStats:
    """Calibration statistics, shared by every format (cached apart from the quantized weights)."""
    path = ptq_cache_dir() / f"calib-{cache_key(model_dir, model, replace(req, quant='none', kv_cache='none'))}"
    stats = read_entry(path, lambda p: load_stats(p, model.embed.weight.device))
    if stats is None:
        windows = calibration_windows(tokenizer, req)
        log.info("calibrating on %d x %d tokens of %s", len(windows), req.calib_seq_len, req.calib_path)
        stats = calibrate(model, windows)
        write_entry(path, lambda tmp: save_stats(stats, tmp))
    return stats


def ptq_cache_dir() -> Path:
    return cache_root() / "ptq"


def kv_format_for(name: str, stats: CalibStats) -> KVFormat:
    """The calibrated KV-cache format `name`: scales from the K/V amax, and for NVFP4 the mean keys."""
    if name == "none":
        return KVFormat()
    return KVFormat(name, [kv_scale_for(name, a) for a in stats.k_amax], [kv_scale_for(name, a) for a in stats.v_amax],
                    stats.k_mean if KV_CACHE_FORMATS[name].centres_keys else None)


def prepare_quantized(model_dir: Path, model: Transformer, tokenizer, req: QuantRequest) -> WeightSet:
    """The model quantized as `req` asks. Quantized weights come from the cache when the same request ran before:
    an export directory (ModelOpt's layout, optimize/export.py) read back onto `model` by the checkpoint loader.
    A KV-cache format alone is formed from the (cached) calibration statistics."""
    if req.quant == "none":
        if req.kv_cache == "none":
            return WeightSet(model)
        return WeightSet(model, kv=kv_format_for(req.kv_cache, calibration_stats(model_dir, model, tokenizer, req)))
    path = ptq_cache_dir() / cache_key(model_dir, model, req)
    cached = read_entry(path, lambda p: load_quantized_layers(p, model))
    if cached is not None:
        log.info("loading calibrated %s / KV %s from %s", req.quant, req.kv_cache, path)
        return cached
    stats = calibration_stats(model_dir, model, tokenizer, req)
    result = WeightSet(quantize_model(model, req.quant, stats, req.smoothquant_alpha), req.quant,
                       kv_format_for(req.kv_cache, stats))
    write_entry(path, lambda tmp: export_checkpoint(model_dir, result, tmp))
    return result
