"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models."""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing

from fastapi import APIRouter, HTTPException
from fastapi import Request as HttpRequest
from fastapi.responses import StreamingResponse

from optiserve.engine.config import SamplingParams
from optiserve.engine.llm_engine import EngineDeadError, RequestError
from optiserve.engine.sequence import RequestOutput, SpecStats, TokenLogprob

from .completion_chunks import CompletionChunks, merge_choice
from .engine_client import EngineClient, EngineRequestError, QueueFullError
from .protocol import ChatCompletionRequest, CompletionRequest, SamplingFields, error_body
from .streams import collect_until_disconnect, merge_streams

router = APIRouter()
log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.5


class ApiError(HTTPException):
    """An error answered in OpenAI's shape; `param`/`code` fill the body's fields of those names."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.param, self.code = param, code


def client_of(raw: HttpRequest) -> EngineClient:
    return raw.app.state.engine_client


def check_model(raw: HttpRequest, name: str) -> None:
    served = raw.app.state.served_model_name
    if name != served:
        raise ApiError(404, f"The model `{name}` does not exist; this server serves `{served}`.", "model",
                       "model_not_found")


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
            n=req.n, stop=req.stop, stop_token_ids=req.stop_token_ids or [], ignore_eos=req.ignore_eos,
            logprobs=logprobs, prompt_logprobs=prompt_logprobs,
        )
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def check_prompts(raw: HttpRequest, client: EngineClient, prompts: list[list[int]], prompt_param: str) -> None:
    """Token ids in the vocabulary and prompts within --max-prompt-tokens (`prompt_param` names the field)."""
    limit = raw.app.state.options.max_prompt_tokens
    if limit is not None and any(len(ids) > limit for ids in prompts):
        raise ApiError(400, f"prompts are limited to {limit} tokens on this server", prompt_param)
    vocab = client.engine.model_config.vocab_size
    for ids in prompts:
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", prompt_param)


def submit(raw: HttpRequest, prompts: list[list[int]], params: SamplingParams, prompt_param: str) -> list:
    """Admit and queue the call's sequences at once (see EngineClient.submit); one output stream per prompt."""
    client = client_of(raw)
    check_prompts(raw, client, prompts, prompt_param)
    try:
        return client.submit(prompts, params, raw.state.request_id)
    except QueueFullError as e:
        raise ApiError(429, str(e), code="queue_full", headers={"Retry-After": "1"}) from None
    except EngineDeadError:
        raise ApiError(503, "the engine has stopped; this server cannot serve requests", code="engine_stopped",
                       headers={"Retry-After": "5"}) from None
    except RequestError as e:
        raise ApiError(400, str(e), prompt_param if e.param == "prompt" else e.param) from None


async def with_error_event(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE events; if producing them fails once the headers are out, one OpenAI-shaped error event, then the end."""
    async with aclosing(events):
        try:
            async for event in events:
                yield event
        except Exception as e:
            if isinstance(e, EngineRequestError):
                message, code = str(e), "engine_error"
            else:
                log.exception("stream failed")
                message, code = f"internal error: {type(e).__name__}", None
            yield sse(error_body(message, "server_error", None, code))


def usage(prompts: list[list[int]], completion_tokens: int, spec: list[SpecStats | None] = ()) -> dict:
    """OpenAI's usage object; with speculation, an extra `speculative` field summing the requests' counts."""
    prompt_tokens = sum(len(p) for p in prompts)
    out = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
           "total_tokens": prompt_tokens + completion_tokens}
    if any(s is not None for s in spec):
        total = SpecStats()
        for s in spec:
            if s is not None:
                total.add(s)
        out["speculative"] = spec_summary(total)
    return out


def spec_summary(s: SpecStats) -> dict:
    return {"num_drafts": s.drafts, "draft_tokens": s.draft_tokens, "accepted_tokens": s.accepted_tokens,
            "acceptance_rate": round(s.acceptance_rate, 4),
            "mean_acceptance_length": round(s.mean_acceptance_length, 4)}


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


# ---- /v1/completions --------------------------------------------------------------------------------------------
def tokenize_prompts(tokenizer, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        prompt = [prompt]
    if isinstance(prompt[0], int):
        return [list(prompt)]
    return [p if isinstance(p, list) else tokenizer(p).input_ids for p in prompt]


@router.post("/v1/completions")
async def completions(req: CompletionRequest, raw: HttpRequest):
    check_model(raw, req.model)
    client = client_of(raw)
    tok = client.engine.tokenizer
    prompts = tokenize_prompts(tok, req.prompt)
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens must be at least 1 unless echo is set", "max_tokens")
    params = sampling_params(req, req.max_tokens, req.logprobs, req.logprobs if req.echo else None)
    streams = submit(raw, prompts, params, "prompt")
    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return StreamingResponse(with_error_event(stream_completion(req, rid, created, prompts, streams, tok)),
                                 media_type="text/event-stream")
    results = await collect_until_disconnect(raw, streams, DISCONNECT_POLL_S)
    chunks = CompletionChunks(req, prompts, tok)
    merged: dict[int, dict] = {}
    for p_idx, outs in enumerate(results):
        for out in outs:
            for choice in chunks.choices(p_idx, out):
                merged[choice["index"]] = merge_choice(merged.get(choice["index"]), choice)
    return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
            "choices": [merged[i] for i in sorted(merged)],
            "usage": usage(prompts, chunks.generated, [outs[-1].spec if outs else None for outs in results])}


async def stream_completion(req: CompletionRequest, rid: str, created: int, prompts: list[list[int]],
                            streams: list[AsyncGenerator[RequestOutput, None]], tok) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": created, "model": req.model}
    chunks = CompletionChunks(req, prompts, tok)
    spec: dict[int, SpecStats | None] = {}
    async for p_idx, out in merge_streams(streams):
        spec[p_idx] = out.spec
        for choice in chunks.choices(p_idx, out):
            yield sse({**base, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompts, chunks.generated, list(spec.values()))})
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions ---------------------------------------------------------------------------------------
def render_chat(tokenizer, req: ChatCompletionRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.text()} for m in req.messages]
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=req.add_generation_prompt,
                                             tokenize=False)
    except Exception as e:  # a template may reject a message order (e.g. two system messages)
        raise ApiError(400, f"the chat template rejected these messages: {e}", "messages") from None
    return tokenizer(text, add_special_tokens=False).input_ids


def chat_logprobs(tok, items: list[TokenLogprob]) -> dict:
    def entry(t: int, lp: float) -> dict:
        text = tok.decode([t])
        return {"token": text, "logprob": lp, "bytes": list(text.encode())}

    return {"content": [{**entry(i.token_id, i.logprob), "top_logprobs": [entry(t, lp) for t, lp in i.top.items()]}
                        for i in items]}


@router.post("/v1/chat/completions")
async def chat_completions(req: ChatCompletionRequest, raw: HttpRequest):
    check_model(raw, req.model)
    client = client_of(raw)
    tok = client.engine.tokenizer
    max_tokens = req.max_completion_tokens or req.max_tokens
    if max_tokens == 0:
        raise ApiError(400, "max_tokens must be at least 1", "max_tokens")
    prompt = render_chat(tok, req)
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None)
    (stream,) = submit(raw, [prompt], params, "messages")
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        return StreamingResponse(with_error_event(stream_chat(req, rid, created, prompt, stream, tok)),
                                 media_type="text/event-stream")
    (outs,) = await collect_until_disconnect(raw, [stream], DISCONNECT_POLL_S)
    choices, generated = [], 0
    for idx in range(req.n):
        parts = [o for out in outs for o in out.outputs if o.index == idx]
        generated += sum(len(o.token_ids) for o in parts)
        lps = [x for o in parts for x in o.logprobs]
        reason = next((o.finish_reason for o in parts if o.finish_reason), None)
        choices.append({"index": idx, "message": {"role": "assistant", "content": "".join(o.text for o in parts)},
                        "logprobs": chat_logprobs(tok, lps) if req.logprobs else None, "finish_reason": reason})
    return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
            "usage": usage([prompt], generated, [outs[-1].spec if outs else None])}


async def stream_chat(req: ChatCompletionRequest, rid: str, created: int, prompt: list[int],
                      stream: AsyncGenerator[RequestOutput, None], tok) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model}
    for idx in range(req.n):
        delta = {"role": "assistant", "content": ""}
        yield sse({**base, "choices": [{"index": idx, "delta": delta, "logprobs": None, "finish_reason": None}]})
    generated, spec = 0, None
    async for _, out in merge_streams([stream]):
        spec = out.spec
        for o in out.outputs:
            generated += len(o.token_ids)
            lp = chat_logprobs(tok, o.logprobs) if req.logprobs else None
            choice = {"index": o.index, "delta": {"content": o.text} if o.text else {}, "logprobs": lp,
                      "finish_reason": o.finish_reason}
            yield sse({**base, "choices": [choice]})
    if req.stream_options and req.stream_options.include_usage:
        yield sse({**base, "choices": [], "usage": usage([prompt], generated, [spec])})
    yield "data: [DONE]\n\n"


@router.get("/v1/models")
async def models(raw: HttpRequest):
    name = raw.app.state.served_model_name
    return {"object": "list", "data": [{"id": name, "object": "model", "created": raw.app.state.started,
                                        "owned_by": "optiserve", "max_model_len": client_of(raw).engine.max_model_len}]}
