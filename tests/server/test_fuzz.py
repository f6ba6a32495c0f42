"""Schemathesis fuzzes the OpenAPI schema: no input may produce a 5xx.

Bounded: a fixed number of examples per operation and generations kept short (a small context and
`max_tokens` capped), so the run takes a minute or two on the CPU.
"""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.conftest import ServerProcess

MAX_EXAMPLES = 25
MAX_TOKENS_CAP = 4


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("fuzz"), "--max-batch", "4", "--max-model-len", "64")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


def steer_body(body) -> None:
    """Name the served model (else nearly every case stops at a 404) and cap generation length."""
    if isinstance(body, dict):
        body["model"] = "SmolLM2-135M-Instruct"
        for key in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(key), int) and body[key] > MAX_TOKENS_CAP:
                body[key] = MAX_TOKENS_CAP
        body.setdefault("max_tokens", MAX_TOKENS_CAP)


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_server_errors(case, fuzz_server):
    steer_body(case.body)
    response = case.call(base_url=fuzz_server.url, timeout=60)
    assert response.status_code < 500, f"{case.method} {case.path} {case.body!r} -> {response.status_code}"
    assert fuzz_server.proc.poll() is None, "the server died"
