"""Continuous batching: a FIFO of waiting sequences and a packed list of running ones (list index = KV slot)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from .kv_cache import SlotTables
from .request_checks import check_fits
from .sequence import SeqStatus, Sequence


class Scheduler:
    """Admits waiting sequences into free slots at step boundaries, while the KV pool has blocks for them, and keeps
    running slots packed.

    A sequence is admitted only if the blocks it may ever hold (prompt + max_tokens + `room`) fit beside those the
    running ones may still grow to: blocks are then taken as tokens arrive and never run out mid-step (no
    preemption needed), while `kv_usage` counts the blocks actually held."""

    def __init__(self, num_slots: int, tables: SlotTables, room: int = 0):
        self.num_slots = num_slots
        self.tables = tables  # each slot's KV blocks (the target's and any drafter's caches read them)
        self.room = room  # cache positions past a sequence's end that a step writes (speculation's)
        self.committed = 0  # blocks the running sequences may grow to
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def blocks_needed(self, num_tokens: int) -> int:
        """Blocks a sequence of `num_tokens` (prompt + max_tokens) may hold at most."""
        return self.tables.pool.blocks_for(min(num_tokens + self.room, self.tables.max_len))

    def check_fits(self, num_tokens: int, param: str) -> None:
        """RequestError if a sequence of `num_tokens` could never be admitted (more blocks than the pool)."""
        check_fits(self.blocks_needed(num_tokens), self.tables.pool.num_blocks, num_tokens, param)

    def _worst_case(self, seq: Sequence) -> int:
        return self.blocks_needed(seq.prompt_len + seq.max_tokens)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> Iterator[Sequence]:
        """Move waiting sequences into free slots, yielding each (it needs a prefill). Lazily: the next one is
        admitted after the caller prefilled (and committed) this one, so it finds a prompt prefix they share."""
        while self.waiting and len(self.running) < self.num_slots:
            need = self._worst_case(self.waiting[0])
            if self.committed + need > self.tables.pool.num_blocks:
                break  # first come, first served: later (smaller) requests wait too
            seq = self.waiting.popleft()
            self.committed += need
            seq.slot, seq.status = len(self.running), SeqStatus.RUNNING
            # Prompt logprobs need logits at every prompt position: such a prompt is computed whole.
            seq.num_cached = self.tables.admit(seq.slot, seq.token_ids, seq.params.prompt_logprobs is None)
            self.running.append(seq)
            yield seq

    def release(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): its blocks go back; the last running one moves into its slot
        (its block table does, no KV is copied)."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            slot, last = seq.slot, self.running[-1]
            self.tables.free(slot)
            self.committed -= self._worst_case(seq)
            if last is not seq:
                self.tables.move(last.slot, slot)
                self.running[slot], last.slot = last, slot
            self.running.pop()
        seq.status, seq.slot = SeqStatus.FINISHED, -1

    def commit(self, seqs: list[Sequence]) -> None:
        """Key the full blocks of each sequence's written positions (all its tokens but the last, whose KV the next
        step writes) for prefix reuse."""
        for seq in seqs:
            if seq.finish_reason is None and seq.status is SeqStatus.RUNNING:
                self.tables.commit(seq.slot, seq.token_ids[:-1])

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.request_id == request_id]

    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by running sequences (0-1, like vLLM)."""
        return self.tables.pool.usage
