"""Continuous batching: a FIFO of waiting sequences and a packed list of running ones (list index = KV slot)."""

from __future__ import annotations

from collections import deque

from .kv_cache import SlotTables
from .sequence import SeqStatus, Sequence


class Scheduler:
    """Admits waiting sequences into free slots at step boundaries and keeps running slots packed."""

    def __init__(self, num_slots: int, tables: SlotTables):
        self.num_slots = num_slots
        self.tables = tables  # each slot's KV blocks (the target's and any drafter's caches read them)
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
        """Take a sequence out (finished or aborted): its blocks go back; the last running one moves into its slot
        (its block table does, no KV is copied)."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            slot, last = seq.slot, self.running[-1]
            self.tables.free(slot)
            if last is not seq:
                self.tables.move(last.slot, slot)
                self.running[slot], last.slot = last, slot
            self.running.pop()
        seq.status, seq.slot = SeqStatus.FINISHED, -1

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.request_id == request_id]

    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by running sequences (0-1, like vLLM)."""
        return self.tables.pool.usage
