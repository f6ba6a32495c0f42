"""Shared fixtures: the real default model (engine and HF reference) and a real server on a free port."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

# Triton decides interpreter-or-compiler when it is first imported, and importing optiserve.engine imports it
# (engine -> kernels). Set the interpreter here, before that, so tests/kernels can run the kernels on the CPU.
# Servers started by the tests inherit it; on CPU tensors the engine uses the torch reference path regardless.
os.environ.setdefault("TRITON_INTERPRET", "1")
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import torch

from optiserve.engine.chat import CHAT_INSTRUCTIONS, chat_prompt_ids
from optiserve.engine.config import EngineConfig
from optiserve.engine.llm_engine import LLMEngine
from optiserve.server.serve_bench import free_port

# A run's models, layouts and PTQ entries go to a cache of its own, removed at the end: tests load many exported and
# pruned checkpoints whose layout entries (hundreds of MB each) are garbage once the run ends. Servers the tests
# start inherit it. A developer may point OPTISERVE_CACHE at a warm cache instead.
RUN_CACHE = None if "OPTISERVE_CACHE" in os.environ else tempfile.mkdtemp(prefix="optiserve-test-cache-")
if RUN_CACHE:
    os.environ["OPTISERVE_CACHE"] = RUN_CACHE


def pytest_unconfigure(config) -> None:
    if RUN_CACHE:
        shutil.rmtree(RUN_CACHE, ignore_errors=True)


CHAT_PROMPTS = CHAT_INSTRUCTIONS  # 8 short single-turn chat prompts
SERVER_START_TIMEOUT_S = 300


@pytest.fixture
def stack_calls(monkeypatch):
    """`watch(owner, name)`: the stack builder `owner.name` (`Transformer.layer_stack`, `DraftHead.head_stack`)
    records, each call, whether it gave a stack (the forward then runs as one kernel call); returns that list.
    `refuse(owner, name)`: it gives none, so the forward runs through the modules."""

    def watch(owner, name: str) -> list[bool]:
        build, calls = getattr(owner, name), []

        def recorded(*args):
            stack = build(*args)
            calls.append(stack is not None)
            return stack

        monkeypatch.setattr(owner, name, recorded)
        return calls

    def refuse(owner, name: str) -> None:
        monkeypatch.setattr(owner, name, lambda *args: None)

    return watch, refuse


@pytest.fixture(scope="session")
def engine() -> LLMEngine:
    return LLMEngine(EngineConfig(model="default", max_batch=8, max_model_len=1024))


@pytest.fixture(scope="session")
def plain_engine(engine) -> LLMEngine:
    """The engine without chunked prefill or prefix caching (whole prompts, nothing reused): the reference the
    defaults must give the same outputs as."""
    return LLMEngine(EngineConfig(max_batch=engine.cfg.max_batch, max_model_len=engine.cfg.max_model_len,
                                  max_num_batched_tokens=0, enable_prefix_caching=False))


@pytest.fixture(autouse=True)
def session_engines_end_with_every_block_free(request) -> Iterator[None]:
    """After each test that used a session engine, its KV pool holds no block: a test (or the code) that leaves
    blocks held fails here, not in a later test that finds the pool short."""
    yield
    for name in ("engine", "plain_engine"):
        if name in request.fixturenames:
            pool = request.getfixturevalue(name).runner.cache.tables.pool
            held = pool.num_blocks - pool.num_free
            assert held == 0, f"{request.node.name} left {held} KV blocks held in the session's `{name}`"


@pytest.fixture(scope="session")
def hf_model(engine):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=torch.float32).eval()


@pytest.fixture(name="chat_prompt_ids", scope="session")
def chat_prompt_ids_fixture(engine) -> list[list[int]]:
    return chat_prompt_ids(engine.tokenizer, CHAT_PROMPTS)


@contextmanager
def scratch_dir(tmp_path_factory, name: str) -> Iterator[Path]:
    """A module fixture's directory, deleted when the fixture ends: exported and pruned models are hundreds of MB
    each, and tmp_path_factory keeps its directories to the end of the run."""
    path = tmp_path_factory.mktemp(name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


class ServerProcess:
    """`optiserve serve` in a subprocess on a free port, healthy when constructed."""

    def __init__(self, log_dir: Path, *extra_args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"server-{self.port}.log"
        cmd = [sys.executable, "-m", "optiserve.server.cli", "serve", "--model", "default", "--port", str(self.port),
               "--max-model-len", "1024", "--log-level", "warning", *extra_args]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        self.stop()
        raise RuntimeError("server did not become healthy in time")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=60)


@pytest.fixture(scope="session")
def server(tmp_path_factory) -> str:
    """The default server (8 slots); yields its base URL."""
    proc = ServerProcess(tmp_path_factory.mktemp("server"), "--max-batch", "8")
    yield proc.url
    proc.stop()
