"""Continuous batching: a FIFO of waiting sequences and a packed list of running ones (list index = KV slot)."""

from __future__ import annotations

from collections import deque

from .kv_cache import KVCache
from .sequence import SeqStatus, Sequence


class Scheduler:
    """Admits waiting sequences into free slots at step boundaries and keeps running slots packed."""

    def __init__(self, num_slots: int, caches: list[KVCache]):
        self.num_slots = num_slots
        self.caches = caches  # the target's KV cache first, then any drafter's (slots move together)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into free slots; returns the newly admitted ones (they need a prefill)."""
        admitted = []
        while self.waiting and len(self.running) < self.num_slots:
            seq = self.waiting.popleft()
            seq.slot, seq.status = len(self.running), SeqStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def release(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted); the last running one moves into its slot."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            slot, last = seq.slot, self.running[-1]
            if last is not seq:
                for cache in self.caches:
                    cache.move(last.slot, slot, len(last.token_ids))
                self.running[slot], last.slot = last, slot
            self.running.pop()
        seq.status, seq.slot = SeqStatus.FINISHED, -1

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.request_id == request_id]

    def kv_usage(self) -> float:
        """Fraction of the KV cache's token positions held by running sequences (0-1, like vLLM)."""
        used = sum(len(s.token_ids) for s in self.running)
        return used / (self.num_slots * self.caches[0].shape.max_len)
