"""`optiserve bench load`: drive a running server's HTTP API with C concurrent clients for S seconds.

Half the clients stream (TTFT measured at the first content chunk), half do not; every request is a chat
completion with a prompt from a small built-in list or `--prompts` (jsonl with `instruction`, or one per line).
A soak run mixes in invalid requests (`--bad-fraction`) and clients that hang up mid-stream
(`--disconnect-fraction`), see `load_mix.py`; good requests are still expected to succeed, every time.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .load_mix import BAD_BODIES, MixSample, bad_request, disconnect_mid_stream, gauges_when_idle, summarize_mix

DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn.",
    "Explain what a hash table is.",
    "Give three tips for better sleep.",
    "What is 17 times 23?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
]


@dataclass
class LoadConfig:
    url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the server's first model
    concurrency: int = 8
    duration_s: float = 30.0
    max_tokens: int = 32
    api_key: str | None = None
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    swaps: list[str] = field(default_factory=list)  # "quant[:kv]" formats to switch to, spread over the run
    admin_token: str | None = None
    bad_fraction: float = 0.0  # share of requests sent invalid on purpose (each must get a 4xx)
    disconnect_fraction: float = 0.0  # share of requests that hang up mid-stream
    seed: int = 0  # the mix of good, bad and dropped requests repeats for a seed

    def __post_init__(self) -> None:
        if self.concurrency < 1 or self.duration_s <= 0 or self.max_tokens < 1:
            raise ValueError("concurrency, duration and max_tokens must be positive")
        if not (self.bad_fraction >= 0 and self.disconnect_fraction >= 0 and self.bad_fraction
                + self.disconnect_fraction <= 1):
            raise ValueError("bad and disconnect fractions must be >= 0 and add up to at most 1")


@dataclass
class Sample:
    ok: bool
    status: int
    latency_s: float
    ttft_s: float | None
    tokens: int


def load_prompts(path: str | None) -> list[str]:
    if path is None:
        return list(DEFAULT_PROMPTS)
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if path.endswith(".jsonl"):
        return [json.loads(line)["instruction"] for line in lines]
    return lines


async def one_request(client: httpx.AsyncClient, cfg: LoadConfig, prompt: str, stream: bool) -> Sample:
    body = {"model": cfg.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": cfg.max_tokens,
            "stream": stream, "stream_options": {"include_usage": True} if stream else None}
    start = time.perf_counter()
    ttft, tokens = None, 0
    try:
        if not stream:
            r = await client.post("/v1/chat/completions", json=body)
            ok = r.status_code == 200
            tokens = r.json()["usage"]["completion_tokens"] if ok else 0
            return Sample(ok, r.status_code, time.perf_counter() - start, None, tokens)
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            async for chunk in sse_chunks(r):
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - start
            return Sample(r.status_code == 200, r.status_code, time.perf_counter() - start, ttft, tokens)
    except httpx.HTTPError:
        return Sample(False, 0, time.perf_counter() - start, None, 0)


async def sse_chunks(response: httpx.Response) -> AsyncIterator[dict]:
    """The JSON chunks of an OpenAI-style event stream, up to `data: [DONE]`."""
    async for line in response.aiter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])


async def scrape(client: httpx.AsyncClient) -> dict[str, float]:
    """The server's /metrics, a value per series name summed over its label sets (one model per server)."""
    values: dict[str, float] = {}
    for line in (await client.get("/metrics")).text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            name = series.split("{")[0]
            values[name] = values.get(name, 0.0) + float(value)
    return values


async def resident_bytes(client: httpx.AsyncClient) -> float | None:
    """The server's resident memory from its /metrics (process collector)."""
    return (await scrape(client)).get("process_resident_memory_bytes")


async def run_swaps(client: httpx.AsyncClient, cfg: LoadConfig, start: float) -> list[dict]:
    """Switch formats at evenly spaced times during the run; record status, duration and memory after each."""
    done = []
    headers = {"Authorization": f"Bearer {cfg.admin_token}"} if cfg.admin_token else {}
    for i, spec in enumerate(cfg.swaps):
        await asyncio.sleep(max(0.0, start + cfg.duration_s * (i + 1) / (len(cfg.swaps) + 1) - time.perf_counter()))
        quant, _, kv = spec.partition(":")
        r = await client.post("/admin/quantization", json={"quant": quant, "kv_cache": kv or "none"},
                              headers=headers)
        done.append({"format": spec, "status": r.status_code, "rss_after": await resident_bytes(client),
                     "swap_seconds": r.json().get("swap_seconds") if r.status_code == 200 else None})
    return done


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    qs = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": qs[49], "p95": qs[94], "p99": qs[98]}


async def run_load(cfg: LoadConfig) -> dict:
    """Run the load and return a summary (requests/s, tokens/s, TTFT and latency percentiles, failures)."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    samples: list[Sample] = []
    mix: list[MixSample] = []
    async with httpx.AsyncClient(base_url=cfg.url, headers=headers, timeout=600) as client:
        if cfg.model is None:
            cfg.model = (await client.get("/v1/models")).json()["data"][0]["id"]
        start = time.perf_counter()

        async def worker(i: int) -> None:
            rng, n = random.Random(cfg.seed * 1_000_003 + i), 0
            while time.perf_counter() - start < cfg.duration_s:
                prompt, draw = cfg.prompts[(i + n) % len(cfg.prompts)], rng.random()
                if draw < cfg.bad_fraction:
                    mix.append(await bad_request(client, cfg.model, rng.choice(sorted(BAD_BODIES))))
                elif draw < cfg.bad_fraction + cfg.disconnect_fraction:
                    mix.append(await disconnect_mid_stream(client, cfg.model, prompt, rng.randint(1, 8)))
                else:
                    samples.append(await one_request(client, cfg, prompt, stream=(i + n) % 2 == 0))
                n += 1

        swaps, *_ = await asyncio.gather(run_swaps(client, cfg, start), report_progress(cfg, start, samples, mix),
                                         *(worker(i) for i in range(cfg.concurrency)))
        elapsed = time.perf_counter() - start
        gauges = await gauges_when_idle(client)
        rss_end = await resident_bytes(client)
    return summarize(cfg, samples, mix, swaps, elapsed, gauges, rss_end)


async def report_progress(cfg: LoadConfig, start: float, samples: list[Sample], mix: list[MixSample]) -> None:
    """A line every 10 s, so a long soak shows it is alive."""
    while (elapsed := time.perf_counter() - start) < cfg.duration_s - 10:
        await asyncio.sleep(10)
        failed = sum(not s.ok for s in samples)
        print(f"[{elapsed + 10:.0f}/{cfg.duration_s:.0f}s] {len(samples)} requests ({failed} failed), "
              f"{len(mix)} bad or dropped", flush=True)


def summarize(cfg: LoadConfig, samples: list[Sample], mix: list[MixSample], swaps: list[dict], elapsed: float,
              gauges: dict[str, float], rss_end: float | None) -> dict:
    ok = [s for s in samples if s.ok]
    failures: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            failures[str(s.status)] = failures.get(str(s.status), 0) + 1
    return {
        "config": {k: v for k, v in asdict(cfg).items() if k not in ("api_key", "admin_token", "prompts")},
        "swaps": swaps, "rss_end": rss_end,
        "rss_growth_after_first_swap": rss_end / swaps[0]["rss_after"] - 1 if swaps and rss_end else None,
        "elapsed_s": elapsed, "requests": len(samples), "succeeded": len(ok), "failures": failures,
        "requests_per_s": len(ok) / elapsed, "output_tokens_per_s": sum(s.tokens for s in ok) / elapsed,
        "ttft_s": percentiles([s.ttft_s for s in ok if s.ttft_s is not None]),
        "latency_s": percentiles([s.latency_s for s in ok]),
        "mix": summarize_mix(mix), "gauges_at_end": gauges,
    }


def bench_load(cfg: LoadConfig, json_path: str | None = None) -> dict:
    """Run, print a summary line, and write JSON when asked."""
    result = asyncio.run(run_load(cfg))
    ttft, lat = result["ttft_s"], result["latency_s"]
    fmt = lambda v: "n/a" if v is None else f"{v * 1000:.0f}ms"  # noqa: E731
    print(f"{result['requests']} requests in {result['elapsed_s']:.1f}s at concurrency {cfg.concurrency}: "
          f"{result['requests_per_s']:.2f} req/s, {result['output_tokens_per_s']:.1f} tok/s out, "
          f"TTFT p50 {fmt(ttft['p50'])} p99 {fmt(ttft['p99'])}, latency p50 {fmt(lat['p50'])} "
          f"p99 {fmt(lat['p99'])}, failures {result['failures'] or 0}")
    for swap in result["swaps"]:
        print(f"swap to {swap['format']}: HTTP {swap['status']} in {swap['swap_seconds']}s, RSS {swap['rss_after']}")
    mix = result["mix"]
    if mix["bad_requests"] or mix["disconnects"]:
        print(f"{mix['bad_requests']} bad requests ({mix['bad_not_4xx']} not answered 4xx), "
              f"{mix['disconnects']} mid-stream disconnects; gauges at the end: {result['gauges_at_end']}")
    if result["rss_growth_after_first_swap"] is not None:
        print(f"RSS at the end vs after the first swap: {result['rss_growth_after_first_swap']:+.1%}")
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result
