"""`optiserve bench load` drives the real server: streaming and non-streaming requests all succeed."""

import json
import subprocess
import sys


def test_bench_load_reports_no_failures(server, tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "optiserve.server.cli", "bench", "load", "--url", server, "--concurrency", "4",
           "--duration", "3", "--max-tokens", "8", "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    assert result["succeeded"] >= 4 and result["failures"] == {}
    assert result["ttft_s"]["p50"] is not None and result["output_tokens_per_s"] > 0


def test_soak_mix_bad_requests_get_4xx_and_good_ones_all_succeed(server, tmp_path):
    """Every kind of invalid request and mid-stream hang-ups, mixed into good traffic: good requests all succeed,
    each bad one gets a 4xx, and the engine's gauges return to 0."""
    out = tmp_path / "soak.json"
    cmd = [sys.executable, "-m", "optiserve.server.cli", "bench", "load", "--url", server, "--concurrency", "6",
           "--duration", "8", "--max-tokens", "8", "--bad-fraction", "0.4", "--disconnect-fraction", "0.2",
           "--json", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(out.read_text())
    mix = result["mix"]
    assert result["succeeded"] >= 3 and result["failures"] == {}, result
    assert mix["bad_requests"] >= 5 and mix["bad_not_4xx"] == 0, mix
    assert mix["disconnects"] >= 1
    assert result["gauges_at_end"] == {"num_requests_running": 0, "num_requests_waiting": 0,
                                       "kv_cache_usage_perc": 0}, result["gauges_at_end"]


def test_bench_serve_reports_http_beside_the_engine(tmp_path):
    """`bench serve` starts its own server (here with chunked prefill and prefix caching behind a shared system
    prompt), streams at two concurrencies while it reads the server's /metrics, then times the engine on the same
    requests: every figure comes back."""
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "optiserve.server.cli", "bench", "serve", "--concurrency", "1,2", "--requests", "4",
           "--max-tokens", "8", "--prompt-tokens", "64", "--shared-prefix-tokens", "64", "--json", str(out), "--",
           "--max-model-len", "256", "--max-num-batched-tokens", "32", "--enable-prefix-caching"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert [lvl["concurrency"] for lvl in result["levels"]] == [1, 2]
    for lvl in result["levels"]:
        assert lvl["requests"] == 4 and lvl["output_tok_s"] > 0 and lvl["ttft_s"]["p50"] > 0
        assert lvl["steady_requests"] == 4 - lvl["concurrency"] and lvl["itl_s_steady"]["p99"] > 0
        assert lvl["itl_samples"] == 4 * (8 - 1)  # a gap per token after the first, special tokens included
        assert lvl["ttft_first_s"] > 0 and lvl["ttft_later_p50_s"] > 0
        server = lvl["server"]  # from the server's /metrics, sampled while the level ran
        assert 1 <= server["peak_running"] <= lvl["concurrency"] and server["peak_waiting"] >= 0
        assert 0 < server["peak_kv_cache_usage"] < 1 and server["preemptions"] == 0
        assert 0 < server["prefix_cache_hit_rate"] < 1  # the shared system prompt's full blocks
    assert result["engine_decode_tok_s_median"] > 0 and result["http_vs_engine"] > 0
    assert result["batch_decode_step_s"] > 0 and result["itl_p99_vs_decode_step"] > 0
