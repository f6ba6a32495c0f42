"""After traffic, /metrics has vLLM's names with the `optiserve:` prefix and the right types, and promtool
accepts it apart from its lint about ':' in names (which vLLM's, SGLang's and llama.cpp's metrics trip too)."""

import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

EXPECTED = {
    "optiserve:time_to_first_token_seconds": "histogram",
    "optiserve:inter_token_latency_seconds": "histogram",
    "optiserve:e2e_request_latency_seconds": "histogram",
    "optiserve:request_queue_time_seconds": "histogram",
    "optiserve:prompt_tokens": "counter",
    "optiserve:generation_tokens": "counter",
    "optiserve:request_success": "counter",
    "optiserve:request_errors": "counter",
    "optiserve:num_requests_running": "gauge",
    "optiserve:num_requests_waiting": "gauge",
    "optiserve:kv_cache_usage_perc": "gauge",
    "optiserve:spec_decode_num_drafts": "counter",
    "optiserve:spec_decode_num_draft_tokens": "counter",
    "optiserve:spec_decode_num_accepted_tokens": "counter",
    "optiserve:spec_decode_num_skipped_steps": "counter",
    "optiserve:model_info": "gauge",  # an Info metric is exposed as a gauge with labels
    "optiserve:model_weight_bytes": "gauge",
    "optiserve:kv_cache_bytes_per_token": "gauge",
    "optiserve:quantization_swaps": "counter",
    "process_resident_memory_bytes": "gauge",
}


@pytest.fixture(scope="module")
def metrics_text(server) -> str:
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello there", "max_tokens": 6, "temperature": 0}
    assert httpx.post(f"{server}/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.post(f"{server}/v1/completions", json={**body, "max_tokens": -3}).status_code == 400
    return httpx.get(f"{server}/metrics").text


def test_names_and_types_after_traffic(metrics_text):
    families = {f.name: f for f in text_string_to_metric_families(metrics_text)}
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, (name, families[name].type)
    success = {s.labels.get("finished_reason"): s.value for s in families["optiserve:request_success"].samples
               if s.name.endswith("_total")}
    assert success.get("length", 0) >= 1
    errors = [s for s in families["optiserve:request_errors"].samples if s.labels.get("status") == "400"]
    assert errors and errors[0].value >= 1
    usage = [s.value for s in families["optiserve:kv_cache_usage_perc"].samples]
    assert all(0.0 <= v <= 1.0 for v in usage)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus package "
                    "(deploy/check_prometheus.sh installs it and runs this check in CI)")
def test_promtool_accepts_the_exposition(metrics_text):
    r = subprocess.run(["promtool", "check", "metrics"], input=metrics_text, capture_output=True, text=True)
    lines = (r.stdout + r.stderr).splitlines()
    problems = [line for line in lines if line.strip() and "should not contain ':'" not in line]
    assert not problems, problems
