"""Schemathesis fuzzes the OpenAPI schema: no input may produce a 5xx.

Bounded: a fixed number of examples per operation and generations kept short (a small context and
`max_tokens` capped), so the run takes a minute or two on the CPU.

Cases come from schemathesis's Hypothesis strategies driven by a plain `@given`, one subtest per
operation, rather than its pytest plugin (`schemathesis.pytest.from_fixture` rewrites pytest's private
node ids and breaks with pytest releases).
"""

import json

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.core.result import Ok

from tests.conftest import ServerProcess

MAX_EXAMPLES = 25
MAX_TOKENS_CAP = 4
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz"), "--max-batch", "4", "--max-model-len", "64")
    yield proc
    proc.stop()


def steer_body(body) -> None:
    """Name the served model (else nearly every case stops at a 404) and cap generation length."""
    if isinstance(body, dict):
        body["model"] = MODEL
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS_CAP:
                body[key] = MAX_TOKENS_CAP
        if body.get("max_tokens") is None:  # absent or null: the rest of the context, up to n=16 times over
            body["max_tokens"] = MAX_TOKENS_CAP


def fuzz_operation(operation, server: ServerProcess) -> None:
    """Call one operation with MAX_EXAMPLES generated cases; every answer must be < 500 and the server alive."""

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def call(case):
        steer_body(case.body)
        response = case.call(base_url=server.url, timeout=60)
        assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code}"
        assert server.proc.poll() is None, "the server died"

    call()


def test_no_server_errors(fuzz_server, subtests):
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations() if isinstance(result, Ok)]
    assert len(operations) >= 4, "the schema lost its operations"
    for operation in operations:
        with subtests.test(operation=operation.label):
            fuzz_operation(operation, fuzz_server)


# Strings the strategies rarely produce: lone UTF-16 surrogates, sent as JSON escapes ("\ud800"). Each is a 400.
SURROGATE_CASES = [
    ("/v1/completions", {"model": MODEL, "prompt": "\ud800", "max_tokens": 2}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udc00x"], "max_tokens": 2}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a\udbff"}]}),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text",
                                                                                          "text": "\ud800"}]}]}),
    ("/v1/chat/completions", {"model": "\ud800", "messages": [{"role": "user", "content": "Hi"}]}),
    ("/v1/chat/completions", {"model": MODEL, "user": "\udfff", "messages": [{"role": "user", "content": "Hi"}]}),
]


@pytest.mark.parametrize(("path", "body"), SURROGATE_CASES)
def test_lone_surrogates_are_400(fuzz_server, path, body):
    r = httpx.post(f"{fuzz_server.url}{path}", content=json.dumps(body), timeout=60,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
