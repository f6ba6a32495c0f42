"""The FastAPI application: routes, error shapes, /health and /metrics."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from optiserve.engine.llm_engine import LLMEngine
from optiserve.optimize.ptq_pipeline import QuantRequest

from .admin import QuantAdmin
from .admin import router as admin_router
from .engine_client import EngineClient, EngineRequestError
from .metrics import ServerMetrics
from .openai_api import ApiError, router
from .protocol import error_response
from .security import GuardMiddleware, ServerOptions

log = logging.getLogger(__name__)


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    # Union members appear in the location as tags such as "function-after[check_text(), str]": not fields.
    loc = [str(x) for x in first.get("loc", ()) if x != "body" and not (isinstance(x, str) and "[" in x)]
    param = ".".join(loc) or None
    return f"{param or 'body'}: {first.get('msg', 'invalid value')}", param


def create_app(
    engine: LLMEngine, served_model_name: str | None = None, options: ServerOptions | None = None,
    quant: QuantRequest | None = None,
) -> FastAPI:
    """An app serving `engine`; start the engine thread with the app's lifespan. `quant` holds the start-up
    calibration settings that live format swaps reuse."""
    name = served_model_name or engine.served_name
    options = options or ServerOptions()
    metrics = ServerMetrics(name, engine.stats)
    metrics.set_model_info(engine)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        await app.state.engine_client.warm_up()  # uvicorn listens once this returns
        yield
        engine.stop()

    docs = {} if options.docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title="optiserve", version="0.1.0", lifespan=lifespan, **docs)
    app.state.engine_client = EngineClient(engine, metrics, options.request_timeout_s, options.max_waiting)
    app.state.options = options
    app.state.draining = False
    app.state.served_model_name = name
    app.state.metrics = metrics
    app.state.started = int(time.time())
    app.state.quant_admin = QuantAdmin(engine, quant or QuantRequest())
    app.include_router(router)
    app.include_router(admin_router)

    def count_error(status: int) -> None:
        metrics.request_errors.labels(name, str(status)).inc()

    app.add_middleware(GuardMiddleware, options=options, state=app.state, on_error=count_error)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(exc)
        count_error(400)
        return error_response(400, message, param)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        count_error(exc.status_code)
        return error_response(exc.status_code, str(exc.detail), exc.param, exc.code, exc.headers)

    @app.exception_handler(EngineRequestError)
    async def on_engine_error(request: Request, exc: EngineRequestError) -> JSONResponse:
        count_error(500)
        return error_response(500, str(exc), code="engine_error")

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        count_error(exc.status_code)
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        count_error(500)
        return error_response(500, f"internal error: {type(exc).__name__}")

    @app.get("/health")
    async def health() -> Response:
        """ok while the engine thread runs; 503 once it has stopped (nothing would be served)."""
        if not engine.alive():
            return error_response(503, "the engine has stopped", code="engine_stopped")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
