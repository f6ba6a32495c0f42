"""The misbehaving part of `optiserve bench load`'s traffic: invalid requests and clients that hang up mid-stream.

A soak run mixes these into good traffic to show that a bad request gets its 4xx and nothing else: good requests
still all succeed, the engine's gauges return to 0, and resident memory settles.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import httpx

# Raw JSON bodies (a lone surrogate and a malformed document cannot be built from Python objects), each of which
# the server must refuse with a 4xx. {model} is filled with the served model's id.
BAD_BODIES: dict[str, str] = {
    "seed_over_64_bits": '{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
                         '"seed": 18446744073709551616, "max_tokens": 4}',
    "negative_max_tokens": '{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}',
    "unknown_model": '{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}',
    "lone_surrogate": '{"model": "{model}", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}',
    "malformed_json": '{"model": "{model}", "messages": [',
    "empty_messages": '{"model": "{model}", "messages": [], "max_tokens": 4}',
    "temperature_out_of_range": '{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
                                '"temperature": 7}',
    "context_overflow": '{"model": "{model}", "messages": [{"role": "user", "content": "hi"}], '
                        '"max_tokens": 100000000}',
}


@dataclass
class MixSample:
    kind: str  # "bad:<name>" or "disconnect"
    status: int  # 0: no answer (transport error)
    ok: bool  # bad: answered 4xx; disconnect: the stream had started (200) before we hung up


async def bad_request(client: httpx.AsyncClient, model: str, name: str) -> MixSample:
    body = BAD_BODIES[name].replace("{model}", model)
    try:
        r = await client.post("/v1/chat/completions", content=body.encode(),
                              headers={"content-type": "application/json"})
    except httpx.HTTPError:
        return MixSample(f"bad:{name}", 0, False)
    return MixSample(f"bad:{name}", r.status_code, 400 <= r.status_code < 500)


async def disconnect_mid_stream(client: httpx.AsyncClient, model: str, prompt: str, after_chunks: int) -> MixSample:
    """Start a long stream, read `after_chunks` chunks, then close the connection."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 256, "stream": True}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            seen = 0
            async for line in r.aiter_lines():
                seen += line.startswith("data: ")
                if seen >= after_chunks:
                    break
            return MixSample("disconnect", r.status_code, r.status_code == 200)
    except httpx.HTTPError:
        return MixSample("disconnect", 0, False)


async def engine_gauges(client: httpx.AsyncClient) -> dict[str, float]:
    """The engine's running/waiting gauges and KV usage from /metrics (summed over label sets)."""
    wanted = ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc")
    gauges = dict.fromkeys(wanted, 0.0)
    for line in (await client.get("/metrics")).text.splitlines():
        name = line.split("{")[0].split(" ")[0].removeprefix("optiserve:")
        if name in gauges and not line.startswith("#"):
            gauges[name] += float(line.rsplit(" ", 1)[1])
    return gauges


async def gauges_when_idle(client: httpx.AsyncClient, timeout_s: float = 30.0) -> dict[str, float]:
    """Poll until every gauge reads 0 (aborted requests are freed at the engine's next step) or time runs out."""
    deadline = time.perf_counter() + timeout_s
    while True:
        gauges = await engine_gauges(client)
        if not any(gauges.values()) or time.perf_counter() > deadline:
            return gauges
        await asyncio.sleep(0.5)


def summarize_mix(samples: list[MixSample]) -> dict:
    """Counts per kind, and the bad requests that were not answered with a 4xx (should be none)."""
    by_kind: dict[str, dict[str, int]] = {}
    for s in samples:
        counts = by_kind.setdefault(s.kind, {})
        counts[str(s.status)] = counts.get(str(s.status), 0) + 1
    wrong = [s for s in samples if s.kind.startswith("bad:") and not s.ok]
    return {"by_kind": by_kind, "bad_requests": sum(s.kind.startswith("bad:") for s in samples),
            "bad_not_4xx": len(wrong), "disconnects": sum(s.kind == "disconnect" for s in samples),
            "bad_not_4xx_examples": [json.dumps({"kind": s.kind, "status": s.status}) for s in wrong[:5]]}
