"""Fixtures for the training tests: a small slice of the shared training text, and a chat-over-HTTP check."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from optiserve.optimize.data import default_calib_path
from tests.conftest import ServerProcess

# The wikitext-2 valid slice shipped with the package, so these tests need no checkout-relative data:
# its first 20 kB train, text from 40 kB on is held out.
TRAIN_CHARS, HELD_OUT_FROM = 20_000, 40_000


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    """The first 20 kB of the shipped wikitext-2 valid slice (training data)."""
    path = tmp_path_factory.mktemp("data") / "train.txt"
    path.write_text(default_calib_path().read_text()[:TRAIN_CHARS])
    return path


@pytest.fixture(scope="session")
def held_out_text(tmp_path_factory) -> Path:
    """Text of the same slice that no training test reads."""
    path = tmp_path_factory.mktemp("data") / "held_out.txt"
    path.write_text(default_calib_path().read_text()[HELD_OUT_FROM:])
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
