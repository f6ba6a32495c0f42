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
