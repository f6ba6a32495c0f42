"""A client that disconnects mid-stream frees its slot: the running count returns to 0."""

import time

import httpx


def running_requests(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(line for line in text.splitlines() if line.startswith("optiserve:num_requests_running"))
    return float(line.rsplit(" ", 1)[1])


def test_disconnect_mid_stream_frees_slot(server):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Tell me a long story.", "max_tokens": 900,
            "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(3):
            assert next(lines).startswith("data: ")
            next(lines)  # the blank line after each event
        assert running_requests(server) >= 1  # still streaming: the sequence holds a slot
    deadline = time.monotonic() + 20
    while running_requests(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running_requests(server) == 0
