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
class SpecStats:
    """Speculative decoding counts (vLLM's): verification steps, drafted and accepted tokens, accepted by position."""

    drafts: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    skipped_steps: int = 0  # steps decoded without drafts (the adaptive policy said no, or nothing to look up)

    def add(self, other: SpecStats) -> None:
        self.skipped_steps += other.skipped_steps
        self.drafts += other.drafts
        self.draft_tokens += other.draft_tokens
        self.accepted_tokens += other.accepted_tokens
        if len(self.accepted_per_pos) < len(other.accepted_per_pos):
            self.accepted_per_pos += [0] * (len(other.accepted_per_pos) - len(self.accepted_per_pos))
        for i, n in enumerate(other.accepted_per_pos):
            self.accepted_per_pos[i] += n

    def minus(self, earlier: SpecStats) -> SpecStats:
        """The counts added since `earlier` (a snapshot of the same running totals)."""
        per_pos = [n - (earlier.accepted_per_pos[i] if i < len(earlier.accepted_per_pos) else 0)
                   for i, n in enumerate(self.accepted_per_pos)]
        return SpecStats(self.drafts - earlier.drafts, self.draft_tokens - earlier.draft_tokens,
                         self.accepted_tokens - earlier.accepted_tokens, per_pos,
                         self.skipped_steps - earlier.skipped_steps)

    def snapshot(self) -> SpecStats:
        return self.minus(SpecStats())

    def record(self, proposed: int, accepted: int) -> None:
        """One verification of `proposed` drafts of which the first `accepted` were accepted (none: a skipped step)."""
        if not proposed:
            self.skipped_steps += 1
            return
        self.drafts += 1
        self.draft_tokens += proposed
        self.accepted_tokens += accepted
        self.add(SpecStats(accepted_per_pos=[1] * accepted))

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification, the target's own token included (EAGLE's τ)."""
        return 1 + self.accepted_tokens / self.drafts if self.drafts else 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Tokens emitted per target forward over every step, those that drafted nothing included (τ counts only the
        steps that drafted: a tree pruned to nothing, or the policy saying no, is a one-token step)."""
        forwards = self.drafts + self.skipped_steps
        return (forwards + self.accepted_tokens) / max(forwards, 1)


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
    spec: SpecStats | None = None  # the request's speculative decoding counts so far (None: not speculating)


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
    spec: SpecStats = field(default_factory=SpecStats)  # speculative decoding counts over its sequences
    error: str | None = None  # set when the engine failed it (its sequences then finish with "error")


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
    num_computed: int = 0  # leading tokens whose KV the cache holds (from the prefix cache, a prefill or decodes)
    num_preemptions: int = 0  # times its blocks were taken back for recompute (vLLM counts the request's)
    text: str = ""
    # Incremental detokenization window over generated ids: text from [text_prefix_offset, text_read_offset) is
    # already in `text` and decodes only as context for the ids after it.
    text_prefix_offset: int = 0
    text_read_offset: int = 0
    sent_text_len: int = 0
    sent_tokens: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    draft_state: object | None = None  # the drafter's per-sequence state (e.g. features not yet drafted from)

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
