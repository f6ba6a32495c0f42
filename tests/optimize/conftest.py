"""Fixtures for the training tests: a small slice of the shared training text, and a chat-over-HTTP check."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import ServerProcess

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
VALID = SHARED / "wikitext-2" / "valid.txt"
TEST = SHARED / "wikitext-2" / "test.txt"


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    """The first 20 kB of wikitext-2 valid (training data; never the test split)."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(VALID.read_text()[:20_000])
    return path


def serves_chat(checkpoint: Path, log_dir: Path) -> str:
    """Start `optiserve serve --model checkpoint`, ask one chat completion over HTTP; returns the answer."""
    server = ServerProcess(log_dir, "--model", str(checkpoint), "--max-batch", "2")
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=120, json={
            "model": checkpoint.name, "max_tokens": 8, "temperature": 0,
            "messages": [{"role": "user", "content": "What is the capital of France?"}]})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["usage"]["completion_tokens"] > 0
        return body["choices"][0]["message"]["content"]
    finally:
        server.stop()
