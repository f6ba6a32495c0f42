"""Prometheus metrics with vLLM's names under the `optiserve:` prefix."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily

from optiserve.engine.sequence import SpecStats

PREFIX = "optiserve:"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

disable_created_metrics()  # no `_created` series, as vLLM does


class EngineTotalsCollector:
    """Counters the engine keeps as totals, under vLLM's names: prefix_cache_queries / prefix_cache_hits (prompt
    tokens) and num_preemptions (sequences)."""

    def __init__(self, model_name: str, engine_stats: Callable[[], object]):
        self.model_name, self.engine_stats = model_name, engine_stats

    def collect(self):
        stats = self.engine_stats()
        for name, value, doc in (("prefix_cache_queries", stats.prefix_cache_queries, "Prompt tokens looked up."),
                                 ("prefix_cache_hits", stats.prefix_cache_hits, "Prompt tokens found cached."),
                                 ("num_preemptions", stats.num_preemptions, "Sequences preempted (recomputed).")):
            family = CounterMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric([self.model_name], value)
            yield family


class ServerMetrics:
    """All metrics of one server, in their own registry (so tests can start several servers)."""

    def __init__(self, model_name: str, engine_stats: Callable[[], object]):
        r = self.registry = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes & co., for memory checks under load
        label = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(f"{PREFIX}time_to_first_token_seconds", "Time to first token.", label,
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}inter_token_latency_seconds", "Time between output tokens.", label,
                             buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}e2e_request_latency_seconds", "End-to-end request latency.", label,
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(f"{PREFIX}request_queue_time_seconds", "Time waiting for a KV slot.", label,
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prefill tokens processed.", label, registry=r)
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", label, registry=r)
        self.request_success = Counter(f"{PREFIX}request_success", "Finished requests by finish reason.",
                                       [*label, "finished_reason"], registry=r)
        self.request_errors = Counter(f"{PREFIX}request_errors", "Requests answered with an error, by status.",
                                      [*label, "status"], registry=r)
        self.running = Gauge(f"{PREFIX}num_requests_running", "Sequences in the running batch.", label, registry=r)
        self.waiting = Gauge(f"{PREFIX}num_requests_waiting", "Sequences waiting for a slot.", label, registry=r)
        self.kv_usage = Gauge(f"{PREFIX}kv_cache_usage_perc", "KV cache usage, 0-1.", label, registry=r)
        self.running.labels(model_name).set_function(lambda: engine_stats().num_running)
        self.waiting.labels(model_name).set_function(lambda: engine_stats().num_waiting)
        self.kv_usage.labels(model_name).set_function(lambda: engine_stats().kv_cache_usage)
        r.register(EngineTotalsCollector(model_name, engine_stats))
        self.info = Info(f"{PREFIX}model", "The served model and its formats.", registry=r)
        self.weight_bytes = Gauge(f"{PREFIX}model_weight_bytes", "Bytes of the active weight set.", label, registry=r)
        self.kv_bytes_per_token = Gauge(f"{PREFIX}kv_cache_bytes_per_token", "KV cache bytes per token.", label,
                                        registry=r)
        self.format_swaps = Counter(f"{PREFIX}quantization_swaps", "Live quantization format swaps.", label,
                                    registry=r)
        self.swap_seconds = Histogram(f"{PREFIX}quantization_swap_seconds", "Duration of format swaps.", label,
                                      buckets=LATENCY_BUCKETS, registry=r)
        # Speculative decoding (vLLM's names); they stay at 0 while no speculation is configured.
        self.spec_drafts = Counter(f"{PREFIX}spec_decode_num_drafts", "Verification steps.", label, registry=r)
        self.spec_draft_tokens = Counter(f"{PREFIX}spec_decode_num_draft_tokens", "Draft tokens proposed.", label,
                                         registry=r)
        self.spec_accepted_tokens = Counter(f"{PREFIX}spec_decode_num_accepted_tokens", "Draft tokens accepted.",
                                            label, registry=r)
        self.spec_accepted_per_pos = Counter(f"{PREFIX}spec_decode_num_accepted_tokens_per_pos",
                                             "Accepted draft tokens by position.", [*label, "position"], registry=r)
        # Steps a running sequence decoded without drafts: the adaptive policy judged drafting would not pay.
        self.spec_skipped = Counter(f"{PREFIX}spec_decode_num_skipped_steps", "Decode steps without drafts.", label,
                                    registry=r)
        for counter in (self.spec_drafts, self.spec_draft_tokens, self.spec_accepted_tokens, self.spec_skipped,
                        self.format_swaps):
            counter.labels(model_name)  # export the series at 0 from the start

    def set_model_info(self, engine) -> None:
        """Publish the model, dtype, formats and sizes of what the engine serves now."""
        w = engine.weights
        self.info.info({"model": self.model_name, "dtype": engine.cfg.dtype, "weight_format": w.weight_format,
                        "kv_cache_format": w.kv_format})
        self.weight_bytes.labels(self.model_name).set(engine.weight_bytes())
        self.kv_bytes_per_token.labels(self.model_name).set(engine.runner.cache.packed_bytes_per_token())

    def observe_spec(self, delta: SpecStats) -> None:
        """Add new speculative decoding counts (vLLM's spec_decode_* counters)."""
        m = self.model_name
        self.spec_drafts.labels(m).inc(delta.drafts)
        self.spec_skipped.labels(m).inc(delta.skipped_steps)
        self.spec_draft_tokens.labels(m).inc(delta.draft_tokens)
        self.spec_accepted_tokens.labels(m).inc(delta.accepted_tokens)
        for pos, n in enumerate(delta.accepted_per_pos):
            if n:
                self.spec_accepted_per_pos.labels(m, str(pos)).inc(n)

    def observe_finished(self, reason: str, prompt_tokens: int, gen_tokens: int, e2e: float) -> None:
        m = self.model_name
        self.request_success.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(prompt_tokens)
        self.generation_tokens.labels(m).inc(gen_tokens)
        self.e2e.labels(m).observe(e2e)
