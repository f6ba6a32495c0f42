"""Live weight swaps: check the new weight set, switch between steps, re-prefill running sequences, roll back
if any of it fails (the engine keeps serving the old weights and no request is failed)."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import sys
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

from .model import Transformer
from .runner import ModelRunner
from .sequence import Sequence
from .weight_set import WeightSet

log = logging.getLogger(__name__)


class SwapError(RuntimeError):
    """A weight swap that did not happen: the engine still serves the weights it served before."""


def release_freed_memory() -> None:
    """Collect the dropped weight set and hand freed heap pages back to the OS (glibc keeps them otherwise,
    so resident memory would grow by a weight set per swap)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass
class PendingSwap:
    """A swap handed to the engine thread; `done` gets None once the new weights serve, or the SwapError."""

    weights: WeightSet
    done: Future = field(default_factory=Future)


def check_swappable(old: WeightSet, new: WeightSet) -> None:
    """Refuse, before anything switches, a model of another architecture (the KV cache and slots are shaped
    for the served one)."""
    if not isinstance(new.model, Transformer):
        raise SwapError(f"not a model: {type(new.model).__name__}")
    if new.model.cfg != old.model.cfg:
        raise SwapError("the new weights belong to a model of another shape than the one served")


class WeightSwitcher:
    """Switches the runner (and drafter) to a weight set and re-prefills the running sequences on it.

    `prefill(seq, token_ids)` recomputes a sequence's KV cache; it is the engine's, so a drafter follows."""

    def __init__(self, runner: ModelRunner, spec, prefill: Callable[[Sequence, list[int]], object]) -> None:
        self.runner, self.spec, self.prefill = runner, spec, prefill

    def attach(self, weights: WeightSet) -> None:
        self.runner.model = weights.model
        self.runner.cache.set_format(weights.kv)
        self.runner.cache.tables.forget_prefixes()  # cached KV was computed by the weights served before
        if self.spec:
            self.spec.attach(weights.model)

    def reprefill(self, running: list[Sequence], on_error: Callable[[Sequence, Exception], None] | None = None) -> None:
        """Recompute each running sequence's cache; a failure raises, or goes to `on_error` (the sequence's)."""
        for seq in running:
            if seq.finish_reason is None and seq.num_computed > 0:
                try:
                    self.prefill(seq, seq.token_ids[: seq.num_computed])
                except Exception as e:
                    if on_error is None:
                        raise
                    on_error(seq, e)

    def switch(self, old: WeightSet, new: WeightSet, running: list[Sequence],
               on_error: Callable[[Sequence, Exception], None]) -> None:
        """Serve `new`, or raise SwapError having gone back to `old` (caches recomputed on it; a sequence whose
        recompute fails there goes to `on_error`)."""
        check_swappable(old, new)
        try:
            self.attach(new)
            self.reprefill(running)
        except Exception as e:
            log.exception("weight swap to %s/%s failed; rolling back", new.weight_format, new.kv_format)
            self.attach(old)
            # The sequences' caches may already hold entries computed by the new weights: recompute them. A
            # failure here is not the swap's to report: the engine fails only the request it happened on.
            self.reprefill(running, on_error)
            raise SwapError(f"the swap to {new.weight_format}/{new.kv_format} failed and was rolled back: "
                            f"{type(e).__name__}: {e}") from e


class SwapQueue:
    """Swaps handed from callers to the engine thread, which applies them between steps."""

    def __init__(self) -> None:
        self._pending: queue.SimpleQueue[PendingSwap] = queue.SimpleQueue()

    def submit(self, weights: WeightSet, wake: Callable[[], None], timeout_s: float) -> None:
        """Queue a swap and wait for the engine thread; raises its SwapError, or SwapError on a timeout."""
        pending = PendingSwap(weights)
        self._pending.put(pending)
        wake()
        try:
            pending.done.result(timeout_s)
        except FutureTimeout:
            pending.done.cancel()  # so the engine skips it if it has not started it yet
            raise SwapError("the engine did not switch weights in time") from None

    def run_pending(self, apply: Callable[[WeightSet], None]) -> None:
        """On the engine thread: apply each queued swap, handing its outcome to the waiting caller."""
        while not self._pending.empty():
            pending = self._pending.get_nowait()
            if not pending.done.set_running_or_notify_cancel():
                continue  # the caller gave up waiting
            try:
                apply(pending.weights)
            except Exception as e:
                pending.done.set_exception(e if isinstance(e, SwapError) else SwapError(f"{type(e).__name__}: {e}"))
            else:
                pending.done.set_result(None)

    def fail_pending(self, exc: Exception) -> None:
        while not self._pending.empty():
            pending = self._pending.get_nowait()
            if pending.done.set_running_or_notify_cancel():
                pending.done.set_exception(exc)
