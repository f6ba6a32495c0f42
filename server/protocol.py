"""OpenAI request schemas (pydantic) and the error shape. Validation here is what makes bad input a 400."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from optiserve.engine.config import SEED_MAX, SEED_MIN

MAX_N = 16
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16


def check_text(value: str) -> str:
    """Reject lone UTF-16 surrogates (JSON can escape them, "\\ud800"; no tokenizer or encoder takes them)."""
    if any("\ud800" <= ch <= "\udfff" for ch in value):
        raise ValueError("the string contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode")
    return value


Text = Annotated[str, AfterValidator(check_text)]


class AsciiJSONResponse(JSONResponse):
    """JSON with non-ASCII escaped: renders any string, even one carrying a lone surrogate."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: Any = None) -> dict:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "timeout_error", 409: "conflict_error",
               413: "invalid_request_error", 429: "rate_limit_error"}


def error_response(status: int, message: str, param: str | None = None, code: Any = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error with the error type that goes with `status`."""
    body = error_body(message, ERROR_TYPES.get(status, "server_error"), param, code)
    return AsciiJSONResponse(body, status_code=status, headers=headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingFields(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = -1
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    seed: Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX)] | None = None
    stop: Text | list[Text] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Literal[0, 0.0] | None = None  # accepted for compatibility; other values are a 400
    frequency_penalty: Literal[0, 0.0] | None = None
    user: Text | None = None

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str] | None) -> list[str]:
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


PromptType = Text | list[Text] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields):
    prompt: PromptType
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: PromptType) -> PromptType:
        if isinstance(v, list) and not v:
            raise ValueError("prompt must not be empty")
        if isinstance(v, list) and isinstance(v[0], list) and any(not p for p in v):
            raise ValueError("token prompts must not be empty")
        return v


class TextPart(BaseModel):
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: Text | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    # Not implemented, so refused rather than silently ignored (values that ask for nothing are accepted).
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("tools", "functions")
    @classmethod
    def _no_tools(cls, v: list[Any] | None, info: ValidationInfo) -> list[Any] | None:
        if v:
            raise ValueError(f"`{info.field_name}` is not supported by this server")
        return v

    @field_validator("tool_choice", "function_call")
    @classmethod
    def _no_tool_choice(cls, v: str | dict[str, Any] | None, info: ValidationInfo) -> str | dict[str, Any] | None:
        if v not in (None, "none"):
            raise ValueError(f"`{info.field_name}` is not supported by this server (only \"none\")")
        return v

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v not in (None, {"type": "text"}):
            raise ValueError("`response_format` is not supported by this server (only {\"type\": \"text\"})")
        return v
