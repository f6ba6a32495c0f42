"""A server with the shipped draft head: usage reports acceptance, and vLLM's spec_decode counters move by the
counts the request reports."""

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CHAT_PROMPTS, ServerProcess

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def spec_server(tmp_path_factory):
    # The full draft every step (the default 5-node tree; a chain for sampled requests), so the counts below are
    # exact (the adaptive budget is in test_spec_policy).
    proc = ServerProcess(tmp_path_factory.mktemp("spec"), "--max-batch", "4", "--speculative", "auto",
                         "--no-speculative-adaptive")
    yield proc.url
    proc.stop()


def spec_counters(url: str) -> dict[str, float]:
    """spec_decode_* sample values, per-position ones keyed as `..._per_pos_total[<position>]`."""
    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if "spec_decode" in s.name and s.name.endswith("_total"):
                key = s.name + (f"[{s.labels['position']}]" if "position" in s.labels else "")
                out[key] = s.value
    return out


def test_usage_and_metrics_report_speculation(spec_server):
    before = spec_counters(spec_server)
    body = {"model": MODEL, "messages": [{"role": "user", "content": CHAT_PROMPTS[2]}], "max_tokens": 48,
            "temperature": 0}
    r = httpx.post(f"{spec_server}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    usage = r.json()["usage"]
    spec = usage["speculative"]
    assert spec["num_drafts"] > 0 and spec["draft_tokens"] == 5 * spec["num_drafts"]
    assert 0 <= spec["acceptance_rate"] <= 1
    # Each verification emits its accepted drafts and one token of the target's (the first token: the prefill).
    assert spec["num_drafts"] + spec["accepted_tokens"] + 1 >= usage["completion_tokens"]
    after = spec_counters(spec_server)
    p = "optiserve:spec_decode_num_"
    assert after[p + "drafts_total"] - before.get(p + "drafts_total", 0) == spec["num_drafts"]
    assert after[p + "draft_tokens_total"] - before.get(p + "draft_tokens_total", 0) == spec["draft_tokens"]
    assert after[p + "accepted_tokens_total"] - before.get(p + "accepted_tokens_total", 0) == spec["accepted_tokens"]
    per_pos = sum(v - before.get(k, 0) for k, v in after.items() if "per_pos" in k)
    assert per_pos == spec["accepted_tokens"]


def test_streamed_usage_reports_speculation(spec_server):
    body = {"model": MODEL, "prompt": "The three primary colors are", "max_tokens": 24, "temperature": 0.7,
            "seed": 1, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{spec_server}/v1/completions", json=body, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] > 0 and usage["speculative"]["num_drafts"] > 0
