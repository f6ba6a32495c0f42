"""What a step hands back to its requests: sampled tokens appended up to the first stop and reported per request,
and any failure on the way kept to the request it happened on (its caller gets an output with `error` set)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .detokenize import append_tokens, take_output
from .faults import check_injected_fault, fail_request
from .sampler import sample_each
from .scheduler import Scheduler
from .sequence import Request, RequestOutput, Sequence
from .spec.decoder import Accepted

log = logging.getLogger(__name__)


@dataclass
class Outputs:
    """The engine's per-request reporting: `guard` runs work that belongs to one request and fails it alone."""

    scheduler: Scheduler
    tokenizer: object
    eos_ids: set[int]
    max_model_len: int
    fault_seed: int | None  # the debug-only fault hook's seed (engine/faults.py); None in production
    speculating: bool  # outputs carry the request's speculative counts

    def guard(self, request: Request, fn: Callable, *args) -> bool:
        """Run `fn(*args)`, work that belongs to `request` alone; if it raises, fail that request. True if ok."""
        try:
            fn(*args)
            return True
        except Exception as e:
            self.fail(request, e)
            return False

    def fail(self, request: Request, exc: Exception) -> None:
        log.error("request %s failed in the engine", request.request_id, exc_info=exc)
        fail_request(self.scheduler, request, f"the engine failed while processing this request ({type(exc).__name__})")

    def sample(self, seqs: list[Sequence], logits: torch.Tensor) -> list[Accepted | None]:
        """One token per sequence from its row of `logits` [B, V]; None where its sampling failed."""
        tokens = sample_each(logits, seqs, lambda seq, e: self.fail(seq.request, e))
        return [None if t is None else Accepted([t], logits[row : row + 1]) for row, t in enumerate(tokens)]

    def append(self, seqs: list[Sequence], results: list[Accepted | None]) -> None:
        """Append each sequence's new tokens up to the first stop, update text, report per request."""
        by_request: dict[str, list[tuple[Sequence, Accepted]]] = {}
        for seq, res in zip(seqs, results, strict=True):
            if res is not None and seq.finish_reason is None:
                by_request.setdefault(seq.request.request_id, []).append((seq, res))
        for group in by_request.values():
            req = group[0][0].request
            self.guard(req, self._append_request, req, group)

    def _append_request(self, req: Request, group: list[tuple[Sequence, Accepted]]) -> None:
        for seq, res in group:
            check_injected_fault(seq, self.fault_seed)
            append_tokens(seq, res.tokens, res.logits, self.eos_ids, self.max_model_len, self.tokenizer)
            seq.num_computed = len(seq.token_ids) - 1  # the newest token's KV is written by the next step
        self.emit(req, [seq for seq, _ in group])

    def finish_echo(self, seq: Sequence) -> None:
        """A scoring request (max_tokens 0) generates nothing: it finishes once its prompt is computed."""
        seq.finish_reason = "length"
        self.emit(seq.request, [seq])

    def emit(self, req: Request, seqs: list[Sequence]) -> None:
        outs = [take_output(seq) for seq in seqs]
        req.num_finished += sum(o.finish_reason is not None for o in outs)
        spec = req.spec.snapshot() if self.speculating else None
        req.emit(RequestOutput(req.request_id, outs, req.prompt_ids, req.prompt_logprobs,
                               req.num_finished == req.params.n, spec=spec))
