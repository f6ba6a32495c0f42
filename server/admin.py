"""Admin routes: the active quantization formats, and a live swap between them (auth in `security.py`)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, replace

from fastapi import APIRouter
from fastapi import Request as HttpRequest
from pydantic import BaseModel, ConfigDict

from optiserve.engine.kv_quant import KV_FORMATS
from optiserve.engine.llm_engine import EngineDeadError, LLMEngine, SwapError
from optiserve.engine.quant import QuantLinear, weight_bytes
from optiserve.engine.threads import on_own_thread
from optiserve.engine.weight_formats import WEIGHT_FORMATS, check_format
from optiserve.optimize.data import read_texts, token_windows
from optiserve.optimize.evaluate import evaluate
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized

from .openai_api import ApiError

router = APIRouter()
PROBE_WINDOWS, PROBE_LEN = 2, 128  # the fixed quality probe: ppl + KL on 2 x 128 calibration tokens


class SwapRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    quant: str
    kv_cache: str = "none"


class QuantAdmin:
    """Holds the start-up calibration settings, the last probe result, and serialises swaps."""

    def __init__(self, engine: LLMEngine, base: QuantRequest):
        self.engine, self.base = engine, base
        self.lock = threading.Lock()
        self.last_probe: dict | None = None
        self.last_swap_s: float | None = None

    def report(self) -> dict:
        w, cache = self.engine.weights, self.engine.runner.cache
        quant_layers = [m for m in w.model.modules() if isinstance(m, QuantLinear)]
        format_bytes, resident_bytes = weight_bytes(w.model)
        return {
            "quant": w.weight_format, "kv_cache": w.kv_format,
            "linear_packed_bytes": sum(m.packed_bytes() for m in quant_layers) if quant_layers else None,
            "linear_bf16_bytes": sum(m.bf16_bytes() for m in quant_layers) or None,
            "weight_bytes": format_bytes,
            "resident_weight_bytes": resident_bytes,
            "master_weight_bytes": (sum(p.nbytes for p in self.engine.master.parameters())
                                    if self.engine.master is not None else None),
            "swappable": self.engine.master is not None,
            "kv_bytes_per_token": cache.packed_bytes_per_token(),
            "resident_kv_bytes_per_token": cache.bytes_per_token,
            "last_quality_probe": self.last_probe, "last_swap_seconds": self.last_swap_s,
        }

    def swap(self, quant: str, kv_cache: str) -> float:
        """Build the new weight set beside the old one, switch between steps, then probe quality. A failed
        switch raises SwapError with the old weights still serving (the lock is released either way)."""
        with self.lock:
            start = time.monotonic()
            req = replace(self.base, quant=quant, kv_cache=kv_cache)
            engine = self.engine
            try:  # built beside the served weights: a failure here changes nothing
                q = prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req)
            except Exception as e:
                raise SwapError(f"could not build the {quant}/{kv_cache} weights: {type(e).__name__}: {e}") from e
            engine.use_weights(q)
            self.last_swap_s = time.monotonic() - start
            windows = token_windows(engine.tokenizer, read_texts(req.calib_path), PROBE_LEN, PROBE_WINDOWS)
            result = evaluate(q.model, windows, engine.master, progress=False, kv=q.kv)
            self.last_probe = {"quant": quant, "kv_cache": kv_cache, **asdict(result)}
            return self.last_swap_s


def admin_of(raw: HttpRequest) -> QuantAdmin:
    return raw.app.state.quant_admin


@router.get("/admin/quantization")
async def get_quantization(raw: HttpRequest) -> dict:
    return admin_of(raw).report()


@router.post("/admin/quantization")
async def post_quantization(body: SwapRequest, raw: HttpRequest) -> dict:
    for value, allowed, what, param in ((body.quant, WEIGHT_FORMATS, "weight", "quant"),
                                        (body.kv_cache, KV_FORMATS, "KV cache", "kv_cache")):
        try:
            check_format(value, allowed, what)
        except ValueError as e:
            raise ApiError(400, str(e), param) from None
    admin = admin_of(raw)
    if admin.engine.master is None:
        raise ApiError(409, "this server holds no unquantized weights to re-quantize from (it loads a "
                       "pre-quantized checkpoint, or was started with --no-swap); restart it on the original model "
                       "without --no-swap to change formats", "quant")
    try:
        seconds = await asyncio.to_thread(on_own_thread, admin.swap, body.quant, body.kv_cache)
    except SwapError as e:  # the engine still serves the formats it served before (see GET)
        raise ApiError(500, str(e), "quant", "swap_failed") from None
    except EngineDeadError:
        raise ApiError(503, "the engine has stopped", code="engine_stopped") from None
    metrics = raw.app.state.metrics
    metrics.format_swaps.labels(metrics.model_name).inc()
    metrics.swap_seconds.labels(metrics.model_name).observe(seconds)
    metrics.set_model_info(admin.engine)
    return {**admin.report(), "swap_seconds": seconds}
