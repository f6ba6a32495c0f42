"""How a request fails without taking the engine down, and a debug-only way to make one fail on purpose."""

from __future__ import annotations

import logging
import os

from .scheduler import Scheduler
from .sequence import Request, RequestOutput, SeqStatus, Sequence

log = logging.getLogger(__name__)

# Debug only: a request with this `seed` raises while the engine appends its tokens, inside a real step, so
# tests can check over HTTP that it fails alone. Unset in production (documented in the README's tests).
FAULT_SEED_ENV = "OPTISERVE_DEBUG_FAULT_SEED"


class EngineDeadError(RuntimeError):
    """The engine thread has stopped: nothing more will be served (the server answers 503)."""


class InjectedFault(RuntimeError):
    """The failure FAULT_SEED_ENV asks for."""


def fault_seed_from_env() -> int | None:
    value = os.environ.get(FAULT_SEED_ENV)
    if not value:
        return None
    log.warning("%s=%s: requests with this seed will fail on purpose (a debug setting)", FAULT_SEED_ENV, value)
    return int(value)


def check_injected_fault(seq: Sequence, fault_seed: int | None) -> None:
    if fault_seed is not None and seq.params.seed == fault_seed:
        raise InjectedFault(f"{FAULT_SEED_ENV}: injected failure for seed {fault_seed}")


def fail_request(scheduler: Scheduler, req: Request, message: str) -> None:
    """End `req` with an error output. Its waiting sequences leave the queue; running ones are only marked
    (the engine releases them at the step boundary, so the slots of the batch being processed stay put)."""
    if req.error is not None:
        return
    req.error = message
    for seq in [s for s in (*scheduler.waiting, *scheduler.running) if s.request is req]:
        if seq.status is SeqStatus.RUNNING:
            seq.finish_reason = "error"
        else:
            scheduler.release(seq)
    try:
        req.emit(RequestOutput(req.request_id, [], req.prompt_ids, finished=True, error=message))
    except Exception:
        log.exception("could not report the failure of request %s", req.request_id)
