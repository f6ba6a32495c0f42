"""`optiserve bench serve`: what a client sees over HTTP, beside what the engine does with the same requests.

Starts `optiserve serve` on a free loopback port, sends streaming greedy chat completions (`ignore_eos`, so every
answer has `max_tokens` tokens) at each concurrency, and reports throughput, time to first token, inter-token
latency and each request's decode rate (tokens after the first over the time between first and last chunk), with
what the server's /metrics say meanwhile (peak running / waiting / KV usage, preemptions, prefix-cache hit rate).
Then it stops the server and, with `engine` given, runs the same requests one at a time through an in-process
engine built with the same arguments, so the HTTP-to-engine ratio comes from one run.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from optiserve.engine.threads import on_own_thread

from .load_bench import percentiles, scrape, sse_chunks
from .metrics import PREFIX

FILLER = ("Context: the committee met on Tuesday to review the quarterly figures, the hiring plan and the "
          "schedule for the new office, and agreed to meet again next month. ")


@dataclass
class ServeBenchConfig:
    concurrency: list[int] = field(default_factory=lambda: [1, 8])
    requests_per_level: int = 0  # 0: twice the concurrency, at least 4
    max_tokens: int = 64
    prompt_tokens: int = 0  # 0: short chat instructions; N: each prompt padded to about N tokens
    shared_prefix_tokens: int = 0  # a system prompt of about this many tokens, the same in every request
    serve_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        if not self.concurrency or min(self.concurrency) < 1 or self.max_tokens < 2:
            raise ValueError("concurrency levels must be >= 1 and max_tokens >= 2")

    def requests_at(self, concurrency: int) -> int:
        return self.requests_per_level or max(4, 2 * concurrency)


@dataclass
class StreamTiming:
    ttft_s: float
    chunk_times: list[float]  # perf_counter of each chunk that carries a token
    tokens: int
    sent: int = 0  # the request's place in the level's sending order

    @property
    def decode_tok_s(self) -> float | None:
        span = self.chunk_times[-1] - self.chunk_times[0] if len(self.chunk_times) > 1 else 0.0
        return (self.tokens - 1) / span if span > 0 else None

    @property
    def inter_token_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]


def build_messages(instruction: str, cfg: ServeBenchConfig, count_tokens: Callable[[str], int]) -> list[dict]:
    """A user turn padded with filler to about `prompt_tokens`, after a shared system prompt when asked."""
    messages = []
    if cfg.shared_prefix_tokens:
        messages.append({"role": "system", "content": pad_to_tokens("", cfg.shared_prefix_tokens, count_tokens)})
    messages.append({"role": "user", "content": pad_to_tokens(instruction, cfg.prompt_tokens, count_tokens)})
    return messages


def pad_to_tokens(text: str, tokens: int, count_tokens: Callable[[str], int]) -> str:
    """`text` then filler: prompts that differ in `text` share no prefix beyond the chat template's."""
    while tokens and count_tokens(text) < tokens:
        text = f"{text} {FILLER}" if text else FILLER
    return text


async def stream_one(client: httpx.AsyncClient, model: str, messages: list[dict], max_tokens: int) -> StreamTiming:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    start, times, tokens = time.perf_counter(), [], 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode()[:200]}")
        async for chunk in sse_chunks(r):
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            elif chunk["choices"] and "role" not in chunk["choices"][0]["delta"]:
                times.append(time.perf_counter())  # a token's chunk, with text or not (a special token has none)
    return StreamTiming(times[0] - start if times else float("nan"), times, tokens)


async def run_level(url: str, model: str, prompts: list[list[dict]], concurrency: int, max_tokens: int) -> dict:
    """`len(prompts)` requests, `concurrency` in flight at a time."""
    queue = list(enumerate(prompts))[::-1]
    timings: list[StreamTiming] = []
    async with httpx.AsyncClient(base_url=url, timeout=3600) as client:
        start = time.perf_counter()

        async def worker() -> None:
            while queue:
                sent, messages = queue.pop()
                timing = await stream_one(client, model, messages, max_tokens)
                timings.append(dataclasses.replace(timing, sent=sent))

        done = asyncio.Event()
        watch = asyncio.create_task(watch_server(client, done))
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
            elapsed = time.perf_counter() - start
        finally:
            done.set()  # the watch ends with the level, whether it completed or not
        server = await watch
    return summarize_level(concurrency, timings, elapsed) | {"server": server}


PEAK_GAUGES = {"running": "num_requests_running", "waiting": "num_requests_waiting",
               "kv_cache_usage": "kv_cache_usage_perc"}


async def watch_server(client: httpx.AsyncClient, done: asyncio.Event, every_s: float = 0.25) -> dict:
    """The server's side of a level from its /metrics: its gauges' peaks (sampled every `every_s` until `done`)
    and what its counters added: preemptions and the prefix cache's hit rate (prompt tokens, vLLM's names)."""
    before = await scrape(client)
    peaks = dict.fromkeys(PEAK_GAUGES, 0.0)
    while not done.is_set():
        now = await scrape(client)
        for key, name in PEAK_GAUGES.items():
            peaks[key] = max(peaks[key], now.get(PREFIX + name, 0.0))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), every_s)
    after = await scrape(client)

    def added(counter: str) -> float:
        return after.get(f"{PREFIX}{counter}_total", 0.0) - before.get(f"{PREFIX}{counter}_total", 0.0)

    queries = added("prefix_cache_queries")
    return {**{f"peak_{key}": value for key, value in peaks.items()}, "preemptions": int(added("num_preemptions")),
            "prefix_cache_hit_rate": added("prefix_cache_hits") / queries if queries else None}


def summarize_level(concurrency: int, timings: list[StreamTiming], elapsed: float) -> dict:
    """Throughput and latency percentiles over every request, and over the steady state: the requests sent after
    the first wave (the first `concurrency` arrive at once, so their prompts queue behind each other). The first
    request's TTFT beside the later ones' shows what a shared prefix saves once it is cached."""
    rates = [t.decode_tok_s for t in timings if t.decode_tok_s]
    steady = [t for t in timings if t.sent >= concurrency]
    later = [t.ttft_s for t in timings if t.sent > 0]
    return {"concurrency": concurrency, "requests": len(timings), "elapsed_s": elapsed,
            "output_tok_s": sum(t.tokens for t in timings) / elapsed,
            "decode_tok_s_per_request_median": statistics.median(rates) if rates else None,
            "ttft_s": percentiles([t.ttft_s for t in timings]),
            "itl_s": percentiles([d for t in timings for d in t.inter_token_s]),
            "itl_samples": sum(len(t.inter_token_s) for t in timings),
            "steady_requests": len(steady),
            "ttft_s_steady": percentiles([t.ttft_s for t in steady]),
            "itl_s_steady": percentiles([d for t in steady for d in t.inter_token_s]),
            "ttft_first_s": next(t.ttft_s for t in timings if t.sent == 0),
            "ttft_later_p50_s": statistics.median(later) if later else None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(cfg: ServeBenchConfig, log_path: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "optiserve.server.cli", "serve", "--port", str(port), "--log-level", "warning",
           *cfg.serve_args]
    proc = subprocess.Popen(cmd, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + cfg.startup_timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start: {log_path.read_text()[-1500:]}")


def engine_decode_rate(engine, messages: list[dict], max_tokens: int, request_id: str) -> float:
    """One request alone through the engine (running on its own thread, as the server runs it); the decode rate
    is measured as a client measures it: tokens after the first over the time between first and last output."""
    from optiserve.engine.sequence import Request

    times, tokens, finished = [], [0], threading.Event()

    def collect(out) -> None:
        new = sum(len(o.token_ids) for o in out.outputs)
        if new:
            times.append(time.perf_counter())
            tokens[0] += new
        if out.finished:
            finished.set()

    engine.add_request(Request(request_id, chat_ids(engine, messages), greedy(max_tokens), collect))
    finished.wait()
    return (tokens[0] - 1) / (times[-1] - times[0])


def batch_decode_step_s(engine, batch: list[list[dict]], max_tokens: int) -> float:
    """The median engine step while every sequence of a full batch decodes: what an inter-token latency at that
    concurrency is held against. The engine (built to prefill whole prompts, so the batch decodes together) is
    driven on this thread."""
    from optiserve.engine.bench import time_ours

    return statistics.median(time_ours(engine, [chat_ids(engine, m) for m in batch], max_tokens))


def chat_ids(engine, messages: list[dict]) -> list[int]:
    text = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return engine.tokenizer(text, add_special_tokens=False).input_ids


def greedy(max_tokens: int):
    from optiserve.engine.config import SamplingParams

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def bench_serve(cfg: ServeBenchConfig, instructions: list[str], count_tokens: Callable[[str], int],
                make_engine: Callable[[], object] | None = None, json_path: str | None = None) -> dict:
    """Every concurrency level over HTTP, then (with `make_engine`) the engine alone on the batch-1 requests."""
    prompts = {c: [build_messages(instructions[i % len(instructions)], cfg, count_tokens)
                   for i in range(cfg.requests_at(c))] for c in cfg.concurrency}
    levels = []
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = start_server(cfg, Path(tmp) / "server.log")
        try:
            model_id = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            for c in cfg.concurrency:
                print(f"concurrency {c}: {len(prompts[c])} requests ...", flush=True)
                levels.append(asyncio.run(run_level(url, model_id, prompts[c], c, cfg.max_tokens)))
                print(format_level(levels[-1]), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    result = {"config": asdict(cfg), "model": model_id, "levels": levels}
    result.update(compare(levels, cfg, prompts, make_engine))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2))
    return result


def compare(levels: list[dict], cfg: ServeBenchConfig, prompts: dict, make_engine) -> dict:
    """Ratios that need two figures from this run: top vs single concurrency, the steady ITL p99 vs the engine's
    decode step at the top concurrency, HTTP vs engine at batch 1 (`make_engine(max_batch)` builds the engine as
    the server's arguments say)."""
    out: dict = {}
    by_c = {lvl["concurrency"]: lvl for lvl in levels}
    if 1 in by_c and max(by_c) > 1:
        out["throughput_vs_one_client"] = by_c[max(by_c)]["output_tok_s"] / by_c[1]["output_tok_s"]
        print(f"throughput at concurrency {max(by_c)} vs 1: {out['throughput_vs_one_client']:.2f}x")
    top = max(by_c)
    if make_engine is not None and top > 1:
        step = on_own_thread(lambda: batch_decode_step_s(make_engine(top, max_num_batched_tokens=0),
                                                         prompts[top][:top], cfg.max_tokens))
        itl = by_c[top]["itl_s_steady"]["p99"] or by_c[top]["itl_s"]["p99"]
        out["batch_decode_step_s"], out["itl_p99_vs_decode_step"] = step, itl / step
        print(f"batch-{top} engine decode step {step * 1000:.1f} ms; steady ITL p99 at concurrency {top} is "
              f"{out['itl_p99_vs_decode_step']:.2f}x that")
    if make_engine is not None and 1 in by_c:
        engine = on_own_thread(make_engine, 1)  # as the server builds it: the engine thread's pool stays alone
        engine.start()
        try:
            rates = [engine_decode_rate(engine, m, cfg.max_tokens, f"bench-{i}") for i, m in enumerate(prompts[1])]
        finally:
            engine.stop()
        out["engine_decode_tok_s_median"] = statistics.median(rates)
        out["http_vs_engine"] = by_c[1]["decode_tok_s_per_request_median"] / out["engine_decode_tok_s_median"]
        print(f"batch-1 decode: HTTP {by_c[1]['decode_tok_s_per_request_median']:.1f} tok/s, engine "
              f"{out['engine_decode_tok_s_median']:.1f} tok/s: {out['http_vs_engine']:.1%}")
    return out


def format_level(lvl: dict) -> str:
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f}ms"  # noqa: E731
    rate = lvl["decode_tok_s_per_request_median"]
    return (f"  {lvl['requests']} requests in {lvl['elapsed_s']:.1f}s: {lvl['output_tok_s']:.1f} tok/s out, "
            f"per-request decode {rate and f'{rate:.1f}'} tok/s, TTFT p50 {ms(lvl['ttft_s']['p50'])} "
            f"p99 {ms(lvl['ttft_s']['p99'])}, ITL p50 {ms(lvl['itl_s']['p50'])} p99 {ms(lvl['itl_s']['p99'])}; "
            f"after the first wave ({lvl['steady_requests']} requests) TTFT p99 {ms(lvl['ttft_s_steady']['p99'])}, "
            f"ITL p99 {ms(lvl['itl_s_steady']['p99'])}; first request's TTFT {ms(lvl['ttft_first_s'])}, later "
            f"ones' p50 {ms(lvl['ttft_later_p50_s'])}\n  {format_server(lvl['server'])}")


def format_server(server: dict) -> str:
    hits = server["prefix_cache_hit_rate"]
    return (f"server: peak {server['peak_running']:.0f} running, {server['peak_waiting']:.0f} waiting, KV cache "
            f"{server['peak_kv_cache_usage']:.0%} used; {server['preemptions']} preemptions; prefix-cache hits "
            f"{'n/a (off)' if hits is None else f'{hits:.1%}'} of prompt tokens")
