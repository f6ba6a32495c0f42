"""The asyncio side of the engine: admit and submit requests, iterate their outputs, abort on disconnect.

Admission and submission happen together, synchronously on the event loop (`submit`), so no two handlers
can both pass the `--max-waiting` check before either is queued. The engine is keyed by an internal id per
request; the client's `X-Request-Id` only labels the logs (two clients may send the same one).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field

from optiserve.engine.config import SamplingParams
from optiserve.engine.llm_engine import EngineDeadError, LLMEngine
from optiserve.engine.request_checks import RequestError
from optiserve.engine.sequence import Request, RequestOutput, SeqOutput, SpecStats

from .metrics import ServerMetrics

log = logging.getLogger("optiserve.requests")


class QueueFullError(RuntimeError):
    """No room in the waiting queue for the request's sequences (the server answers 429)."""


class EngineRequestError(RuntimeError):
    """The engine failed this request (the server answers 500, or an error event mid-stream)."""


@dataclass
class Submission:
    """One request handed to the engine: where its outputs arrive, and whether its sequences still count."""

    request: Request
    client_id: str
    outputs: asyncio.Queue[RequestOutput | None] = field(default_factory=asyncio.Queue)  # None: timed out
    counted: bool = True


class EngineClient:
    """Bridges HTTP handlers (event loop) and the engine thread; records per-request latency metrics."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, timeout_s: float = 600.0, max_waiting: int = 256):
        self.engine = engine
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.max_waiting = max_waiting
        self.in_flight = 0  # sequences submitted and not yet finished or aborted (touched on the event loop only)

    def submit(self, prompts: list[list[int]], params: SamplingParams, client_id: str) -> list[AsyncGenerator]:
        """Admit all of a call's sequences (`n` per prompt) or none, queue them in the engine, and return one
        output stream per prompt. Raises EngineDeadError, QueueFullError, or the engine's RequestError."""
        if not self.engine.alive():
            raise EngineDeadError("the engine has stopped")
        new = len(prompts) * params.n
        if self.in_flight + new - self.engine.cfg.max_batch > self.max_waiting:
            raise QueueFullError(f"the server's waiting queue is full ({self.max_waiting} sequences); retry later")
        for ids in prompts:  # all checked before any is queued
            self.engine.check_request(len(ids), params.max_tokens)
        loop = asyncio.get_running_loop()
        subs = []
        for i, ids in enumerate(prompts):
            label = client_id if len(prompts) == 1 else f"{client_id}-{i}"
            request = Request(uuid.uuid4().hex, ids, params, lambda out: None)
            sub = Submission(request, label)
            request.emit = lambda out, sub=sub: loop.call_soon_threadsafe(self._deliver, sub, out)
            self.engine.add_request(request)
            self.in_flight += params.n
            subs.append(sub)
        return [self._stream(sub) for sub in subs]

    async def warm_up(self) -> None:
        """One chat through the chat template and the engine before the server takes requests: the first render
        of the template and the engine's first prompt chunk and decode steps (its worker pool, buffers) cost
        50-100 ms more than later ones here, which a user's first request would otherwise wait for (SGLang sends
        such a request at start-up too). Not counted in the request metrics."""
        tok = self.engine.tokenizer
        question = "Name three primary colors and say where each one is seen in nature. " * 8  # ~120 tokens: a chunk
        text = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                       tokenize=False)
        loop, done = asyncio.get_running_loop(), asyncio.Event()

        def emit(out: RequestOutput) -> None:
            if out.error:
                log.warning("the start-up warm-up request failed: %s", out.error)
            if out.finished:
                loop.call_soon_threadsafe(done.set)

        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        ids = tok(text, add_special_tokens=False).input_ids[: self.engine.max_model_len - params.max_tokens]
        try:
            self.engine.add_request(Request(f"warm-up-{uuid.uuid4().hex}", ids, params, emit))
        except RequestError as e:  # a context or KV pool too small for it: nothing to warm up
            log.warning("no start-up warm-up request: %s", e)
            return
        await done.wait()

    def _deliver(self, sub: Submission, out: RequestOutput) -> None:
        sub.outputs.put_nowait(out)
        if out.finished:  # counted off here too, so a stream nobody reads does not hold its place forever
            self._uncount(sub)

    def _uncount(self, sub: Submission) -> None:
        if sub.counted:
            sub.counted = False
            self.in_flight -= sub.request.params.n

    async def _stream(self, sub: Submission) -> AsyncGenerator[RequestOutput, None]:
        """Yield the request's outputs as the engine produces them; aborts it if the consumer stops early.

        Past the per-request timeout the request is aborted and ends like a `length` stop with what it has (as
        documented; logged and counted as `timeout`). An engine failure raises EngineRequestError instead.
        """
        request, rid = sub.request, sub.request.request_id
        params, prompt_ids = request.params, request.prompt_ids
        m, name = self.metrics, self.metrics.model_name
        start = last = time.monotonic()
        generated, reason, finished = 0, "abort", False
        open_seqs = set(range(params.n))
        spec_seen = SpecStats()  # the request's counts already added to the metrics
        # One timer per request, not a `wait_for` (a task and a timer) per output.
        timer = asyncio.get_running_loop().call_later(self.timeout_s, sub.outputs.put_nowait, None)
        try:
            while not finished:
                out = await sub.outputs.get()
                if out is None:
                    if not self.engine.alive():
                        raise EngineRequestError("the engine stopped before finishing this request")
                    self.engine.abort(rid)
                    out = RequestOutput(rid, [SeqOutput(i, [], "", [], "length") for i in sorted(open_seqs)],
                                        prompt_ids, finished=True)
                    log.warning("request %s timed out after %.1fs", sub.client_id, self.timeout_s)
                    reason = "timeout"
                if out.error:
                    reason = "error"
                    raise EngineRequestError(out.error)
                if out.spec is not None:  # cumulative per request: add what is new since the last output
                    delta = out.spec.minus(spec_seen)
                    m.observe_spec(delta)
                    spec_seen.add(delta)
                now = time.monotonic()
                new = sum(len(o.token_ids) for o in out.outputs)
                if new:
                    if generated == 0:
                        m.ttft.labels(name).observe(now - start)
                        if request.first_scheduled is not None:
                            m.queue_time.labels(name).observe(max(0.0, request.first_scheduled - start))
                    else:
                        m.itl.labels(name).observe((now - last) / new)
                    generated, last = generated + new, now
                open_seqs -= {o.index for o in out.outputs if o.finish_reason}
                if reason != "timeout":
                    reason = next((o.finish_reason for o in out.outputs if o.finish_reason), reason)
                finished = out.finished
                yield out
        finally:
            timer.cancel()
            if not finished:
                self.engine.abort(rid)
            self._uncount(sub)
            e2e = time.monotonic() - start
            if reason != "error":  # a failed request is no success of any finish reason
                m.observe_finished(reason, len(prompt_ids), generated, e2e)
            spec = ""
            if spec_seen.drafts:
                spec = f" acceptance={spec_seen.acceptance_rate:.3f} tau={spec_seen.mean_acceptance_length:.2f}"
            log.info("request %s (engine %s) %s: prompt=%d generated=%d e2e=%.3fs%s", sub.client_id, rid, reason,
                     len(prompt_ids), generated, e2e, spec)
