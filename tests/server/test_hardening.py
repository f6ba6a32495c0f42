"""Auth, limits (429, 413, timeout), request ids and graceful shutdown, on real servers."""

import hmac
import signal
import threading
import time

import httpx
import pytest

from optiserve.server import security
from tests.conftest import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
API_KEY, ADMIN = "test-key", "admin-secret"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
LONG = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 400, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """One slot, one waiting place, a 3 s request timeout, a 4 KB body limit, an API key and an admin token."""
    proc = ServerProcess(tmp_path_factory.mktemp("guarded"), "--max-batch", "1", "--max-waiting", "1",
                         "--request-timeout", "3", "--max-body-bytes", "4096", "--api-key", API_KEY,
                         "--admin-token", ADMIN)
    yield proc.url
    proc.stop()


def auth(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


def test_api_key_required_on_v1_only(guarded):
    assert httpx.post(f"{guarded}/v1/chat/completions", json=CHAT).status_code == 401
    assert httpx.post(f"{guarded}/v1/chat/completions", json=CHAT, headers=auth("wrong")).status_code == 401
    r = httpx.post(f"{guarded}/v1/chat/completions", json=CHAT, headers=auth(API_KEY), timeout=60)
    assert r.status_code == 200
    assert httpx.get(f"{guarded}/health").status_code == 200 and httpx.get(f"{guarded}/metrics").status_code == 200
    assert httpx.get(f"{guarded}/v1/models").json()["error"]["type"] == "authentication_error"


def test_admin_needs_admin_token(guarded, server):
    assert httpx.get(f"{guarded}/admin/quantization").status_code == 401
    assert httpx.get(f"{guarded}/admin/quantization", headers=auth(API_KEY)).status_code == 401
    assert httpx.get(f"{guarded}/admin/quantization", headers=auth(ADMIN)).status_code == 200
    assert httpx.get(f"{server}/admin/quantization", headers=auth(ADMIN)).status_code == 403  # no token set


def test_keys_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(security.hmac, "compare_digest", spy)

    class Req:
        headers = {"authorization": "Bearer abc"}

    assert security.bearer_matches(Req(), "abc") and not security.bearer_matches(Req(), "abd")
    assert calls == [(b"abc", b"abc"), (b"abc", b"abd")]


def test_body_too_large_is_413(guarded):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    r = httpx.post(f"{guarded}/v1/chat/completions", json=body, headers=auth(API_KEY))
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_full_queue_is_429_with_retry_after(guarded):
    """One slot + one waiting place: the third concurrent request is refused, not queued forever."""
    streams = []
    try:
        for _ in range(2):  # occupy the slot and the waiting place
            cm = httpx.stream("POST", f"{guarded}/v1/completions", json=LONG, headers=auth(API_KEY), timeout=60)
            r = cm.__enter__()
            streams.append(cm)
            assert r.status_code == 200
        r = httpx.post(f"{guarded}/v1/chat/completions", json=CHAT, headers=auth(API_KEY))
        assert r.status_code == 429 and r.headers["Retry-After"] and r.json()["error"]["code"] == "queue_full"
    finally:
        for cm in streams:
            cm.__exit__(None, None, None)


def test_request_timeout_truncates_like_length(guarded):
    time.sleep(1)  # let aborted streams of the previous test leave
    body = {"model": MODEL, "prompt": "Count to a thousand:", "max_tokens": 900, "ignore_eos": True}
    t0 = time.monotonic()
    r = httpx.post(f"{guarded}/v1/completions", json=body, headers=auth(API_KEY), timeout=60)
    assert r.status_code == 200 and time.monotonic() - t0 < 15
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] < 900


def test_request_id_is_honoured(server):
    r = httpx.get(f"{server}/v1/models", headers={"X-Request-Id": "abc-123"})
    assert r.headers["X-Request-Id"] == "abc-123"
    assert httpx.get(f"{server}/v1/models").headers["X-Request-Id"]


def test_sigterm_drains_running_request_then_exits(tmp_path):
    proc = ServerProcess(tmp_path, "--max-batch", "2")
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 40, "ignore_eos": True}
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=httpx.post(f"{proc.url}/v1/completions", json=body,
                                                                           timeout=60)))
    worker.start()
    time.sleep(0.5)  # the request is running
    proc.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    try:  # no longer admitting: the listener is closed, or a kept-alive connection gets 503
        refused = httpx.post(f"{proc.url}/v1/completions", json=body, timeout=10).status_code == 503
    except httpx.TransportError:
        refused = True
    assert refused
    worker.join(timeout=60)
    assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 40
    assert proc.proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining


def test_a_request_the_kv_pool_could_never_hold_is_a_400_up_front(tmp_path, engine):
    """A pool of 4 blocks (64 tokens) under a 1,024-token context: a chat whose prompt + max_tokens needs more
    blocks is refused before any work with an OpenAI-style 400 naming `max_tokens`, streaming or not, and one that
    fits is answered before and after."""
    block_bytes = 16 * engine.runner.cache.bytes_per_token  # the default model's fp32 K and V, as the server holds
    proc = ServerProcess(tmp_path, "--max-batch", "2", "--kv-cache-memory", str(4 * block_bytes))
    try:
        url = f"{proc.url}/v1/chat/completions"
        assert httpx.post(url, json=CHAT, timeout=60).status_code == 200
        for stream in (False, True):
            r = httpx.post(url, json={**CHAT, "max_tokens": 200, "stream": stream}, timeout=60)
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "max_tokens" and "KV-cache blocks" in error["message"]
        assert httpx.post(url, json=CHAT, timeout=60).json()["usage"]["completion_tokens"] == 4
    finally:
        proc.stop()
