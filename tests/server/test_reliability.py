"""Issue 15 over HTTP: one request never takes others down, ids, atomic admission, body limits, bad input.

One server: 4 slots, 8 waiting places, an API key, a 4 KB body limit, and the debug fault hook (a request
with FAULT_SEED raises inside the engine step that appends its tokens).
"""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from fastapi.testclient import TestClient

from optiserve.engine.config import EngineConfig
from optiserve.engine.faults import FAULT_SEED_ENV
from optiserve.engine.llm_engine import LLMEngine
from optiserve.optimize.ptq_pipeline import QuantRequest
from optiserve.server.app import create_app
from optiserve.server.security import ServerOptions
from tests.conftest import CHAT_PROMPTS, ServerProcess

MODEL = "SmolLM2-135M-Instruct"
KEY = "reliability-key"
FAULT_SEED = 424242
HEADERS = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(FAULT_SEED_ENV, str(FAULT_SEED))
        proc = ServerProcess(tmp_path_factory.mktemp("reliability"), "--max-batch", "4", "--max-waiting", "8",
                             "--api-key", KEY, "--max-body-bytes", "4096")
    yield proc.url
    proc.stop()


def chat(prompt: str, **extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": 12,
            "temperature": 0, **extra}


def post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, headers={**HEADERS, **kw.pop("headers", {})}, timeout=120, **kw)


def sse_events(url: str, body: dict) -> list:
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=120) as r:
        assert r.status_code == 200
        return [line[6:] for line in r.iter_lines() if line.startswith("data: ")]


def texts(url: str, prompts: list[str]) -> list[str]:
    with ThreadPoolExecutor(len(prompts)) as pool:
        rs = list(pool.map(lambda p: post(url, "/v1/chat/completions", chat(p)), prompts))
    return [r.json()["choices"][0]["message"]["content"] for r in rs]


def test_seed_outside_64_bits_is_400(url):
    for seed in (2**64, 2**63, -(2**63) - 1):
        r = post(url, "/v1/chat/completions", chat("Hi", seed=seed))
        assert r.status_code == 400 and r.json()["error"]["param"] == "seed", seed
    r = post(url, "/v1/chat/completions", chat("Hi", seed=2**63 - 1, n=2, temperature=1.0, max_tokens=2))
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_failing_request_fails_alone(url):
    """7 requests alongside one that raises in the engine (streamed: an error event, then the end) and one
    non-streamed (a 500): the 7 give the same greedy text as without them, and the server stays healthy."""
    prompts = CHAT_PROMPTS[:7]
    alone = texts(url, prompts)
    with ThreadPoolExecutor(3) as pool:
        together = pool.submit(texts, url, prompts)
        streamed = pool.submit(sse_events, url, chat("Tell me a story.", seed=FAULT_SEED, temperature=1.0))
        whole = pool.submit(post, url, "/v1/chat/completions", chat("Hi", seed=FAULT_SEED, temperature=1.0))
        assert together.result() == alone
        events = streamed.result()
        response = whole.result()
    error = json.loads(events[-1])["error"]
    assert error["type"] == "server_error" and error["code"] == "engine_error" and "[DONE]" not in events
    assert response.status_code == 500 and response.json()["error"]["code"] == "engine_error"
    assert httpx.get(f"{url}/health").status_code == 200


def test_same_request_id_cannot_abort_another(url):
    """Two streams with one X-Request-Id: the first disconnecting leaves the second to finish."""
    body = {"model": MODEL, "prompt": "Count:", "max_tokens": 24, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    dup = {**HEADERS, "X-Request-Id": "same-id"}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=dup, timeout=120) as first:
        next(first.iter_lines())
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=dup, timeout=60) as second:
            assert second.headers["X-Request-Id"] == "same-id"
            first.close()  # its abort must not reach the second
            events = [line[6:] for line in second.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["usage"]["completion_tokens"] == 24


def test_admission_is_atomic_and_counts_n(url):
    """30 streams at once: 4 slots + 8 waiting places admit at most 12 sequences, the rest get 429."""
    body = {"model": MODEL, "prompt": "Tell me a story.", "max_tokens": 64, "ignore_eos": True, "stream": True}
    barrier, statuses = threading.Barrier(30, timeout=120), []

    def one() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=HEADERS, timeout=120) as r:
            statuses.append(r.status_code)
            barrier.wait()  # hold every admitted stream open until all have their answer

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses.count(200) <= 12 and statuses.count(429) >= 18 and len(statuses) == 30
    r = post(url, "/v1/chat/completions", chat("Hi", n=13, temperature=1.0))  # 13 sequences > 4 + 8
    assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"


def test_chunked_body_over_the_limit_is_413_before_it_ends(url):
    """A chunked upload past --max-body-bytes that never ends: the 413 comes anyway."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {KEY}\r\n"
                  "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
        chunk = b"x" * 1024
        for _ in range(8):  # 8 KB of a 4 KB limit, and no terminating chunk
            s.sendall(b"400\r\n" + chunk + b"\r\n")
        status_line = s.recv(4096).split(b"\r\n", 1)[0]
    assert b" 413 " in status_line


def test_chunked_body_under_the_limit_reaches_the_route(url):
    """A chunked upload within the limit: the guard reads it whole, then hands it on to the route unchanged."""
    body = chat("Name a colour.")
    raw = json.dumps(body).encode()
    pieces = (raw[i : i + 16] for i in range(0, len(raw), 16))  # an iterator: httpx sends it chunked
    r = httpx.post(f"{url}/v1/chat/completions", content=pieces, timeout=120,
                   headers={**HEADERS, "Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"] == post(url, "/v1/chat/completions", body).json()["choices"][0]["message"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"model": MODEL, "prompt": "a\ud800b", "max_tokens": 2}, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "Hi"}]}, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["\udfff"]}, "stop"),
])
def test_lone_surrogate_is_400(url, path, body, param):
    raw = json.dumps(body)  # ASCII JSON: the surrogate goes out as the escape "\ud800", as a client would send it
    assert "\\ud" in raw
    r = httpx.post(f"{url}{path}", content=raw, headers={**HEADERS, "Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"].startswith(param)


def test_docs_need_the_api_key(url):
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}").status_code == 401, path
        assert httpx.get(f"{url}{path}", headers=HEADERS).status_code == 200, path


@pytest.mark.parametrize(("field", "value"), [
    ("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
    ("functions", [{"name": "f"}]), ("response_format", {"type": "json_object"}),
])
def test_unsupported_fields_are_400(url, field, value):
    r = post(url, "/v1/chat/completions", chat("Hi", **{field: value}))
    assert r.status_code == 400 and r.json()["error"]["param"] == field and "not supported" in r.text


def test_fields_that_ask_for_nothing_are_accepted(url):
    r = post(url, "/v1/chat/completions", chat("Hi", tool_choice="none", response_format={"type": "text"}))
    assert r.status_code == 200


def test_empty_prompt_names_the_prompt(url):
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "", "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


@pytest.fixture(scope="module")
def small_engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="default", max_batch=1, max_model_len=64))


def test_failed_swap_answers_an_error_and_keeps_serving(small_engine, tmp_path):
    """In-process: a swap whose weights cannot be built (its calibration file is missing) is a 500 naming the
    cause; the old formats keep serving, the swap lock is free, requests still run."""
    quant = QuantRequest(calib_data=str(tmp_path / "missing.txt"))
    app = create_app(small_engine, options=ServerOptions(admin_token="t"), quant=quant)
    with TestClient(app) as client:
        admin = {"Authorization": "Bearer t"}
        r = client.post("/admin/quantization", json={"quant": "int8"}, headers=admin)
        assert r.status_code == 500 and r.json()["error"]["code"] == "swap_failed" and "missing.txt" in r.text
        assert not app.state.quant_admin.lock.locked()
        assert client.get("/admin/quantization", headers=admin).json()["quant"] == "none"
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 200


def test_start_up_warm_up_runs_the_engine_but_is_no_request(small_engine):
    """The lifespan sends one chat (~120 tokens, cut to the context) through the engine before the server
    listens (its first prompt chunk and decode steps cost more than later ones); the request metrics do not count
    it."""
    queried = small_engine.stats().prefix_cache_queries
    with TestClient(create_app(small_engine)) as client:
        assert small_engine.stats().prefix_cache_queries > queried  # its prompt went through the scheduler
        text = client.get("/metrics").text
    counted = [line for line in text.splitlines() if line.startswith(("optiserve:request_success_total",
                                                                      "optiserve:prompt_tokens_total"))]
    assert all(float(line.split()[-1]) == 0 for line in counted), counted  # a labelled counter has no line at 0


def test_dead_engine_thread_is_503_at_once(small_engine):
    """In-process: the app over an engine whose thread has stopped (as a crash would leave it)."""
    engine = small_engine
    with TestClient(create_app(engine)) as client:
        assert client.get("/health").status_code == 200
        engine.stop()
        assert client.get("/health").status_code == 503
        t0 = time.monotonic()
        r = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_stopped"
        assert time.monotonic() - t0 < 5
