"""Records for one request and its sequences, and what the engine reports back for them."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch

from .config import SamplingParams


class SeqStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    """The chosen token's logprob and the top alternatives (token id -> logprob)."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class SeqOutput:
    """A delta for one sequence: what it produced since the last report."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class RequestOutput:
    """What the engine hands back to the caller after a step."""

    request_id: str
    outputs: list[SeqOutput]
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finished: bool = False
    error: str | None = None


@dataclass
class Request:
    """A user request: one prompt, `params.n` sequences, and a callback that receives outputs."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[RequestOutput], None]
    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    num_finished: int = 0


@dataclass
class Sequence:
    """One generated continuation of a request's prompt; owns a KV slot while running."""

    request: Request
    index: int
    token_ids: list[int]
    max_tokens: int
    generator: torch.Generator | None = None
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    text: str = ""
    sent_text_len: int = 0
    sent_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - self.prompt_len

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def params(self) -> SamplingParams:
        return self.request.params
