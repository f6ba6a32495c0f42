"""The asyncio side of the engine: submit a request, iterate its outputs, abort it when the client goes away."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator

from optiserve.engine.config import SamplingParams
from optiserve.engine.llm_engine import LLMEngine
from optiserve.engine.sequence import Request, RequestOutput, SeqOutput, SpecStats

from .metrics import ServerMetrics

log = logging.getLogger("optiserve.requests")


class EngineClient:
    """Bridges HTTP handlers (event loop) and the engine thread; records per-request latency metrics."""

    def __init__(self, engine: LLMEngine, metrics: ServerMetrics, timeout_s: float = 600.0):
        self.engine = engine
        self.metrics = metrics
        self.timeout_s = timeout_s

    async def generate(
        self, prompt_ids: list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's outputs as the engine produces them; aborts it if the consumer stops early.

        Past the per-request timeout the request is aborted and ends like a `length` stop: the caller gets
        what was generated so far, never a hang.
        """
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput] = asyncio.Queue()
        rid = request_id or uuid.uuid4().hex
        request = Request(rid, prompt_ids, params, lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out))
        self.engine.add_request(request)  # raises RequestError for a request that cannot fit
        m, name = self.metrics, self.metrics.model_name
        start = last = time.monotonic()
        deadline = start + self.timeout_s
        generated, reason, finished = 0, "abort", False
        open_seqs = set(range(params.n))
        spec_seen = SpecStats()  # the request's counts already added to the metrics
        try:
            while not finished:
                try:
                    out = await asyncio.wait_for(outputs.get(), max(0.0, deadline - time.monotonic()))
                except TimeoutError:
                    self.engine.abort(rid)
                    out = RequestOutput(rid, [SeqOutput(i, [], "", [], "length") for i in sorted(open_seqs)],
                                        prompt_ids, finished=True)
                    log.warning("request %s timed out after %.1fs", rid, self.timeout_s)
                if out.error:
                    raise RuntimeError(out.error)
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
                reason = next((o.finish_reason for o in out.outputs if o.finish_reason), reason)
                finished = out.finished
                yield out
        finally:
            if not finished:
                self.engine.abort(rid)
            e2e = time.monotonic() - start
            m.observe_finished(reason, len(prompt_ids), generated, e2e)
            spec = ""
            if spec_seen.drafts:
                spec = f" acceptance={spec_seen.acceptance_rate:.3f} tau={spec_seen.mean_acceptance_length:.2f}"
            log.info("request %s %s: prompt=%d generated=%d e2e=%.3fs%s", rid, reason, len(prompt_ids), generated, e2e,
                     spec)
