"""Continuous batching: a FIFO of waiting sequences and a packed list of running ones (list index = KV slot).

Two ways to admit, by `token_budget`:
- 0 (whole prompts): a sequence is admitted only if the blocks it may ever hold (prompt + max_tokens + `room`) fit
  beside those the running ones may still grow to, and is prefilled whole; blocks never run out mid-step (what a
  speculative step, which writes drafts past the end, relies on).
- N (chunked prefill, `schedule`): each step computes at most N tokens, one for each decoding sequence first, then
  chunks of the prompts being prefilled, then of newly admitted ones (vLLM's order). A step in which the sequences
  waiting for their first token outnumber those streaming computes up to `prefill_budget` (>= N) tokens: with no
  stream, none waits on it; with a few, they wait one long step instead of a wave of prompts many. Blocks are
  taken for the scheduled tokens only; when the pool runs short the running sequence in the last slot not yet
  planned this step is preempted: its blocks go back and it waits at the front of the queue, to be recomputed (its
  prompt and what it generated; prefix caching finds its full blocks again) when readmitted. The first sequence
  planned is never preempted for another, so some sequence always progresses.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from .block_manager import NoFreeBlocks
from .kv_cache import SlotTables
from .request_checks import check_fits
from .sequence import SeqStatus, Sequence


@dataclass
class Chunk:
    """Positions [start, start + num_tokens) of a running sequence, computed in this step."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """Whether it reaches the sequence's last token: its logits give the next token."""
        return self.end == len(self.seq.token_ids)


@dataclass
class StepPlan:
    chunks: list[Chunk] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # KV blocks to copy first (forked sequences)


class Scheduler:
    """Admits waiting sequences into free slots at step boundaries, while the KV pool has blocks for them, and keeps
    running slots packed; `kv_usage` counts the blocks actually held."""

    def __init__(self, num_slots: int, tables: SlotTables, room: int = 0, token_budget: int = 0,
                 prefill_budget: int = 0):
        self.num_slots = num_slots
        self.tables = tables  # each slot's KV blocks (the target's and any drafter's caches read them)
        self.room = room  # cache positions past a sequence's end that a step writes (speculation's)
        self.token_budget = token_budget  # tokens per step (chunked prefill); 0: whole prompts
        self.prefill_budget = prefill_budget or token_budget  # tokens per step while prompts outnumber streams
        self.reserved_blocks = 0  # whole prompts: blocks the running sequences may grow to
        self.num_preemptions = 0
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
            if self.reserved_blocks + need > self.tables.pool.num_blocks:
                break  # first come, first served: later (smaller) requests wait too
            seq = self.waiting.popleft()
            self.reserved_blocks += need
            # Prompt logprobs need logits at every prompt position: such a prompt is computed whole.
            cached = self.tables.admit(len(self.running), seq.token_ids, seq.params.prompt_logprobs is None)
            self._run(seq, cached)
            yield seq

    def _run(self, seq: Sequence, num_computed: int) -> None:
        """`seq` (taken from the queue) runs in the next slot, its first `num_computed` positions cached."""
        seq.slot, seq.status, seq.num_computed = len(self.running), SeqStatus.RUNNING, num_computed
        self.running.append(seq)
        if seq.request.first_scheduled is None:
            seq.request.first_scheduled = time.monotonic()

    def release(self, seq: Sequence) -> None:
        """Take a sequence out (finished or aborted): its blocks go back; the last running one moves into its slot
        (its block table does, no KV is copied)."""
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            slot, last = seq.slot, self.running[-1]
            self.tables.free(slot)
            if not self.token_budget:
                self.reserved_blocks -= self._worst_case(seq)
            if last is not seq:
                self.tables.move(last.slot, slot)
                self.running[slot], last.slot = last, slot
            self.running.pop()
        seq.status, seq.slot = SeqStatus.FINISHED, -1

    def commit(self, seqs: list[Sequence]) -> None:
        """Key the full blocks of each sequence's written positions for prefix reuse."""
        for seq in seqs:
            if seq.finish_reason is None and seq.status is SeqStatus.RUNNING:
                self.tables.commit(seq.slot, seq.token_ids[: seq.num_computed])

    def sequences_of(self, request_id: str) -> list[Sequence]:
        return [s for s in (*self.waiting, *self.running) if s.request.request_id == request_id]

    def kv_usage(self) -> float:
        """Fraction of the KV cache's blocks held by running sequences (0-1, like vLLM)."""
        return self.tables.pool.usage

    # ---- chunked prefill ---------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """The next step's chunks under the token budget, their blocks taken (preempting when the pool is short):
        decode rows first (so running streams keep their pace), then the prompts being computed, in slot order."""
        plan, preemptions = StepPlan(), self.num_preemptions
        decode_first = sorted(self.running, key=lambda s: len(s.token_ids) - s.num_computed > 1)
        budget = self.prefill_budget if self._prompts_outnumber_streams() else self.token_budget
        for seq in decode_first:
            if budget == 0:
                break
            if seq.status is not SeqStatus.RUNNING:
                continue  # preempted for one planned before it
            n = min(len(seq.token_ids) - seq.num_computed, budget)
            if self._reserve_or_preempt(seq, seq.num_computed + n, plan):
                plan.chunks.append(Chunk(seq, seq.num_computed, n))
                budget -= n
        for chunk in plan.chunks:
            self._key_blocks(chunk)
        if self.num_preemptions > preemptions:
            return plan  # the pool is short: nothing new is admitted
        while budget > 0 and self.waiting and len(self.running) < self.num_slots:
            chunk = self._admit_chunk(self.waiting[0], budget, plan)
            if chunk is None:
                break
            plan.chunks.append(chunk)
            self._key_blocks(chunk)
            budget -= chunk.num_tokens
        return plan

    def _prompts_outnumber_streams(self) -> bool:
        """Whether more sequences wait for their first token (admitted, or admissible into a free slot) than stream
        tokens: then one long step serves them all (TGI's waiting-served ratio), where budget-sized chunks would
        hold the last of a wave of prompts for many steps, each paying the decode rows' weight reads again."""
        streams = sum(s.num_generated > 0 for s in self.running)
        admissible = min(len(self.waiting), self.num_slots - len(self.running))
        return len(self.running) - streams + admissible > streams

    def _key_blocks(self, chunk: Chunk) -> None:
        """Key the full blocks `chunk` completes now: a prompt admitted later in this step finds them (the forward
        writes every row's KV before any row attends). A failed forward forgets them (`forget_prefixes`)."""
        self.tables.commit(chunk.seq.slot, chunk.seq.token_ids[: chunk.end])

    def _reserve_or_preempt(self, seq: Sequence, num_tokens: int, plan: StepPlan) -> bool:
        """Blocks for `seq`'s positions [0, num_tokens), preempting the running sequences not planned yet from the
        last slot down until they fit; False if none is left but `seq`, which is then preempted itself."""
        planned = {id(c.seq) for c in plan.chunks}
        while True:
            try:
                self.tables.reserve(seq.slot, num_tokens)
                return True
            except NoFreeBlocks:
                victims = [s for s in reversed(self.running) if s is not seq and id(s) not in planned]
                self.preempt(victims[0] if victims else seq)
                if not victims:
                    return False

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first again; it is recomputed when readmitted."""
        self.release(seq)
        seq.status, seq.num_computed = SeqStatus.WAITING, 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit_chunk(self, seq: Sequence, budget: int, plan: StepPlan) -> Chunk | None:
        """Admit `seq` into the next slot with its first chunk, or None (blocks short, or a sibling still
        prefills the prompt it would share)."""
        slot, lookup = len(self.running), seq.params.prompt_logprobs is None
        sibling = self._sibling_with_prompt(seq)
        if sibling is False:
            return None
        try:
            if sibling is not None:  # n > 1: share the sibling's prompt KV, compute only the last prompt token
                copies, start = self.tables.fork(sibling.slot, slot, seq.prompt_len - 1), seq.prompt_len - 1
            else:
                copies, start = [], self.tables.match_prefix(slot, seq.token_ids, lookup)
            n = min(len(seq.token_ids) - start, budget)
            self.tables.reserve(slot, start + n)
        except NoFreeBlocks:
            self.tables.free(slot)
            return None
        plan.block_copies += copies
        if sibling is None and seq.num_preemptions == 0:  # a recompute is no new query (as vLLM counts)
            self.tables.count_query(slot, len(seq.token_ids))
        self.waiting.popleft()
        self._run(seq, start)
        return Chunk(seq, start, n)

    def _sibling_with_prompt(self, seq: Sequence) -> Sequence | None | bool:
        """A running sequence of the same request whose prompt KV is computed (None: there is none to share;
        False: one is still prefilling it, so `seq` waits a step rather than computing the prompt twice)."""
        if seq.num_generated > 0:
            return None  # a preempted sequence recomputes its own tokens
        for other in self.running:
            if other.request is seq.request:
                return other if other.num_computed >= seq.prompt_len - 1 else False
        return None
