"""Auth (API key, admin token), request ids, body-size limit, and the draining switch for graceful shutdown."""

from __future__ import annotations

import hmac
import uuid
from dataclasses import dataclass

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .protocol import error_response

OPEN_PATHS = ("/health", "/metrics")
DOCS_PATHS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")  # behind --api-key like /v1
REQUEST_ID_HEADER = "X-Request-Id"


@dataclass
class ServerOptions:
    """Server-side limits and secrets (the engine has its own config)."""

    api_key: str | None = None
    admin_token: str | None = None
    max_waiting: int = 256
    request_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None  # None: the context length
    docs: bool = True  # serve /docs, /redoc and /openapi.json (--disable-docs turns them off)

    def __post_init__(self) -> None:
        if self.max_waiting < 0:
            raise ValueError("max_waiting must be >= 0")
        if self.request_timeout_s <= 0:
            raise ValueError("request_timeout_s must be > 0")


def bearer_matches(request: Request, secret: str) -> bool:
    """Constant-time comparison of the request's Bearer token with `secret`."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), secret.encode())


class GuardMiddleware:
    """Per request: assign an id, refuse while draining, check auth and body size.

    A plain ASGI middleware, so a streamed response's chunks go straight to the server's `send` (Starlette's
    `BaseHTTPMiddleware` relays each one through a memory stream and a task of its own)."""

    def __init__(self, app: ASGIApp, options: ServerOptions, state, on_error):
        self.app, self.options, self.state, self.on_error = app, options, state, on_error

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        rid = request.headers.get(REQUEST_ID_HEADER) or uuid.uuid4().hex
        request.state.request_id = rid  # kept in scope["state"]: the route's Request sees it

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, rid)
            await send(message)

        refusal, body = await self.check(request)
        if refusal is not None:
            self.on_error(refusal.status_code)
            await refusal(scope, receive, send_with_id)
        else:
            await self.app(scope, receive if body is None else replay(body, receive), send_with_id)

    async def check(self, request: Request) -> tuple[Response | None, bytes | None]:
        """A refusal, or None; and the body if it had to be read here (a chunked upload), else None."""
        path, opts = request.url.path, self.options
        if path in OPEN_PATHS:
            return None, None
        if getattr(self.state, "draining", False):
            return error_response(503, "the server is shutting down", headers={"Retry-After": "5"}), None
        if path.startswith("/admin"):
            if not opts.admin_token:
                return error_response(403, "admin endpoints are disabled: start with --admin-token"), None
            if not bearer_matches(request, opts.admin_token):
                return error_response(401, "a valid admin Bearer token is required"), None
        elif self.needs_api_key(path) and not bearer_matches(request, opts.api_key):
            return error_response(401, "a valid API key is required (Authorization: Bearer ...)"), None
        return await self.check_body_size(request)

    def needs_api_key(self, path: str) -> bool:
        return bool(self.options.api_key) and (path.startswith("/v1") or path in DOCS_PATHS)

    async def check_body_size(self, request: Request) -> tuple[Response | None, bytes | None]:
        """413 for a body over --max-body-bytes: at once from Content-Length, else while reading a chunked
        body (reading stops at the limit, so an endless upload costs at most the limit in memory)."""
        limit = self.options.max_body_bytes
        too_big = error_response(413, f"the request body exceeds {limit} bytes")
        length = request.headers.get("content-length")
        if length is not None:
            return (too_big if not length.isdigit() or int(length) > limit else None), None
        if request.method not in ("POST", "PUT", "PATCH"):
            return None, None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                return too_big, None
            chunks.append(chunk)
        return None, b"".join(chunks)


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that hands the app a body already read, then goes on with the connection's (disconnects)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive_again() -> Message:
        return pending.pop() if pending else await receive()

    return receive_again
