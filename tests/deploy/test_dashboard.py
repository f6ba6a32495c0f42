"""The Grafana dashboard names only metrics that the server's own registry exports."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from optiserve.server.metrics import PREFIX, ServerMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "optiserve.json"
METRIC_NAME = re.compile(re.escape(PREFIX) + r"[a-zA-Z0-9_:]+")
# How the text exposition names a family's series (prometheus_client drops `_total` from a counter's family
# name and `_info` from an info's; gauges keep theirs).
SERIES_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "info": ("_info",),
                   "summary": ("_sum", "_count"), "gauge": ("",)}
SPEC_DECODE_COUNTERS = {f"{PREFIX}spec_decode_num_accepted_tokens_total", f"{PREFIX}spec_decode_num_draft_tokens_total",
                        f"{PREFIX}spec_decode_num_drafts_total"}


def exported_series_names() -> set[str]:
    """Every series name the server's /metrics can carry, from a real `ServerMetrics` registry.

    Labelled metrics have no samples until a label set is used, so names come from each family's type as
    well as from the samples present.
    """
    stats = SimpleNamespace(num_running=0, num_waiting=0, kv_cache_usage=0.0, prefix_cache_queries=0,
                            prefix_cache_hits=0, num_preemptions=0)
    metrics = ServerMetrics("test-model", lambda: stats)
    names = set()
    for family in metrics.registry.collect():
        names.update(family.name + suffix for suffix in SERIES_SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def dashboard_strings(node) -> list[str]:
    """All strings in the dashboard: panel queries, and variable queries (label_values(...)) too."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        node = list(node.values())
    if isinstance(node, list):
        return [s for item in node for s in dashboard_strings(item)]
    return []


def unknown_metric_names(text: str, exported: set[str]) -> set[str]:
    return set(METRIC_NAME.findall(text)) - exported


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_series_names()


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_registry_names_include_the_series_the_dashboard_is_built_on(exported):
    # Guards the suffix logic above: these are the names /metrics serves.
    for name in ("request_success_total", "time_to_first_token_seconds_bucket", "num_requests_waiting",
                 "kv_cache_usage_perc", "model_info"):
        assert PREFIX + name in exported


def test_checker_flags_a_metric_the_server_does_not_export(exported):
    assert unknown_metric_names("rate(optiserve:request_sucess_total[5m])", exported) == {
        "optiserve:request_sucess_total"}
    # A counter's family name is not a series name in the exposition.
    assert unknown_metric_names("optiserve:request_success", exported) == {"optiserve:request_success"}


def test_every_dashboard_query_uses_only_exported_metrics(dashboard, exported):
    unknown = {}
    for text in dashboard_strings(dashboard):
        if missing := unknown_metric_names(text, exported):
            unknown[text] = sorted(missing)
    assert not unknown, f"dashboard names metrics the server does not export: {unknown}"


def test_dashboard_panels_cover_the_issue(dashboard):
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs and all(METRIC_NAME.search(e) for e in exprs)
    used = {name for e in exprs for name in METRIC_NAME.findall(e)}
    wanted = {"request_success_total", "prompt_tokens_total", "generation_tokens_total",
              "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
              "e2e_request_latency_seconds_bucket", "num_requests_waiting", "num_requests_running",
              "kv_cache_usage_perc", "request_errors_total", "model_info"}
    assert {PREFIX + n for n in wanted} | SPEC_DECODE_COUNTERS <= used
    quantiles = {float(q) for e in exprs for q in re.findall(r"histogram_quantile\(([0-9.]+)", e)}
    assert quantiles == {0.5, 0.95, 0.99}


def test_panels_query_the_datasource_variable(dashboard):
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
