"""When to draft: each step, the draft budget that maximises expected tokens per second, measured online.

Expected tokens of a step drafting k tokens per sequence: 1 + sum_{j<=k} prod_{i<j} c_i, with c_i the EMA of P(draft
position i accepted | position i-1 accepted). Its cost, relative to a plain decode step at that batch size: 1 + r_B
* k, with r_B the EMA of the measured extra cost per draft token (drafting + verify rows) at batch B. Rows are
nearly free at batch 1 (the weights are read once) and cost compute at batch 8, so r_B grows with B and drafting
turns off under load unless acceptance is high. A batch size not measured yet borrows r from the nearest one that is
scaled in proportion to the batch (before any, the prior times B: at batch 8 a first tree at r_8 = 0.1 cost 6-14
plain steps). The head reads a backlog (a prompt, skipped steps) before a step, timed apart, so every step where
all sequences draft teaches r, whether drafting was on before it or not (were those steps untimed, r could only
rise while drafting is off, and one slow step could keep it off). A step where only some sequences drafted (a
probe at batch > 1) is not timed for r, but its verify alone, scaled to the whole batch, is a floor: r rises to
it. Budget 0 is
a plain decode step; it also refreshes the plain-step time. While off, a one-token probe keeps c_1 and r current,
every `probe_every` steps or less often where a probe costs more (at batch 8 a draft row costs compute): its extra
cost stays within `probe_overhead` of the steps between (up to `max_probe_every`), as measured on the probes
themselves once there are some (their catch-up on skipped steps: a cost that a steady draft step's r_B does not
show). At batch > 1 a probe drafts for one sequence (the decoder picks it): the head then catches up on that
sequence's skipped steps alone, not on every sequence's. A row
that accepts its whole chain says nothing of the next position: its estimate drifts back toward the prior, so a
chain that shrank can grow again. A draft tree is drafted whole or not at all (`whole`): a smaller node budget makes
it narrower as well as shallower, so the acceptance measured on the whole tree does not tell what a smaller one
would get; its probe is the whole tree. A tree pruned to its likely nodes (`--speculative-min-prob`) drafts fewer
than the budget, none where nothing is likely: its r is per node it drafts on average (each step's extra cost over
that average, so r times it is a step's mean extra cost), and a sequence given no node is a rejection at position
1 (its step emits one token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class PolicyConfig:
    max_budget: int  # the drafter's chain length (num_speculative_tokens)
    ema: float = 0.1  # weight of a new observation
    probe_every: int = 16  # the fewest steps between probes while off, and between plain-step re-timings
    probe_overhead: float = 0.02  # a probe's extra cost over the plain steps between probes, at most
    max_probe_every: int = 64  # ... but never rarer: one noisy timing must not keep drafting off for long
    prior_acceptance: float = 0.5  # c_i before any observation: optimistic enough to try drafting
    prior_cost_per_draft: float = 0.1  # r_1 before any observation (r_B: B times it)
    whole: bool = False  # a draft tree: budgets are max_budget or 0

    def __post_init__(self) -> None:
        if self.max_budget < 1:
            raise ValueError("max_budget must be >= 1")
        if not 0.0 < self.ema <= 1.0:
            raise ValueError("ema must be in (0, 1]")
        if not 2 <= self.probe_every <= self.max_probe_every:
            raise ValueError("need 2 <= probe_every <= max_probe_every")
        if not 0.0 < self.probe_overhead <= 1.0:
            raise ValueError("probe_overhead must be in (0, 1]")


@dataclass
class StepRecord:
    """One speculative (or plain) step as it happened: the budget asked, per sequence the drafts proposed, how
    many of them were accepted and how deep they went (a chain: its length; a tree: its deepest node; None: the
    drafts are chains), the step's wall time (drafting + verifying; a backlog the head read first, a new prompt
    or the steps that drafted nothing, is timed apart: it is paid once, not by the steps after it), whether that
    time is a steady step's (one where only some sequences drafted, a probe at batch > 1, teaches acceptance and,
    by its verify's seconds alone, a floor of the cost of a draft), and whether the step was the policy's probe
    (its time, backlog included, is what probing costs)."""

    budget: int
    drafted: list[int]
    accepted: list[int]
    seconds: float
    depths: list[int] | None = None
    timed: bool = True
    probe: bool = False
    verify_seconds: float | None = None
    backlog_seconds: float = 0.0  # the head reading a backlog before the step (not in `seconds`)


@dataclass
class BatchCost:
    """Per batch size: seconds of a plain step, and extra costs relative to it, per draft token of a steady step
    and of a whole probe step (EMAs)."""

    plain_s: float | None = None
    per_draft: float | None = None
    probe_extra: float | None = None
    since_plain: int = 0  # steps since the plain-step time was last measured
    since_draft: int = 0  # steps since the last drafting step


@dataclass
class AdaptivePolicy:
    cfg: PolicyConfig
    acceptance: list[float] = field(default_factory=list)  # c_i, [max_budget]
    costs: dict[int, BatchCost] = field(default_factory=dict)
    steps_drafted: int = 0
    steps_skipped: int = 0
    tree_nodes: float | None = None  # a whole tree's nodes per sequence, on average (EMA; a pruned tree has fewer)
    probing: bool = False  # whether the last budget was a probe's

    def __post_init__(self) -> None:
        if not self.acceptance:
            self.acceptance = [self.cfg.prior_acceptance] * self.cfg.max_budget

    def expected_tokens(self, k: int) -> float:
        """Tokens a step drafting k emits on average, the target's own token included."""
        total, reach = 1.0, 1.0
        for c in self.acceptance[:k]:
            reach *= c
            total += reach
        return total

    def relative_cost(self, batch: int, k: int) -> float:
        """A step asking k drafts, in plain steps: r_B per draft it gets (a whole tree: per node on average)."""
        return 1.0 + self.per_draft(batch) * (self.tree_width if self.cfg.whole and k else k)

    @property
    def tree_width(self) -> float:
        """The nodes a whole tree's cost is counted in: its average (at least 1: a tree pruned to nothing still
        costs its drafting), the budget before any is measured."""
        return max(self.cfg.max_budget if self.tree_nodes is None else self.tree_nodes, 1.0)

    def per_draft(self, batch: int) -> float:
        """r at `batch`, else the nearest measured batch size's (the larger on a tie) scaled to `batch`: verify rows
        cost compute in proportion to the batch (the prior's rule), so r_6 = 0.3 must not let batch 8 try a
        full-batch tree that costs 15 plain steps."""
        known = {b: c.per_draft for b, c in self.costs.items() if c.per_draft is not None}
        if not known:
            return self.cfg.prior_cost_per_draft * batch
        nearest = min(known, key=lambda b: (abs(b - batch), -b))  # batch itself when measured
        return known[nearest] * batch / nearest

    def probe_interval(self, batch: int) -> int:
        """Steps between probes while off at `batch`."""
        extra = self._cost(batch).probe_extra
        if extra is None:
            extra = self.relative_cost(batch, self.probe_size) - 1.0
        wanted = math.ceil(extra / self.cfg.probe_overhead)
        return min(max(self.cfg.probe_every, wanted), self.cfg.max_probe_every)

    @property
    def probe_size(self) -> int:
        """Draft tokens of a probe while off: one, or the whole tree."""
        return self.cfg.max_budget if self.cfg.whole else 1

    def best_budget(self, batch: int) -> int:
        """argmax_k tokens/second relative to plain decoding; 0 when no k gains."""
        budgets = (0, self.cfg.max_budget) if self.cfg.whole else range(self.cfg.max_budget + 1)
        return max(budgets, key=lambda k: (self.expected_tokens(k) / self.relative_cost(batch, k), -k))

    def budget(self, seqs: list) -> int:
        """Draft tokens per sequence for the coming step of `seqs` (0: a plain decode step)."""
        cost = self._cost(len(seqs))
        cost.since_plain += 1
        cost.since_draft += 1
        k = self.best_budget(len(seqs))
        self.probing = False
        if cost.plain_s is None or (k and cost.since_plain > self.cfg.probe_every):
            return 0  # time a plain step first, and re-time it now and then: context length and load drift
        if k == 0 and cost.since_draft > self.probe_interval(len(seqs)):
            self.probing = True
            return self.probe_size  # it measures c_1 and r, so drafting can come back
        return k

    def observe(self, rec: StepRecord) -> None:
        """Fold one step's acceptance and timing into the estimates."""
        cost = self._cost(len(rec.drafted))
        width = max(rec.drafted, default=0)
        if rec.budget == 0 or (width == 0 and not self.cfg.whole):
            self.steps_skipped += rec.budget == 0
            cost.plain_s = self._ema(cost.plain_s, rec.seconds)
            cost.since_plain = 0
            return
        self.steps_drafted += 1
        cost.since_draft = 0
        if self.cfg.whole:
            self._observe_tree_nodes(rec)
            width = self.tree_width  # steps of pruned trees of any size teach one cost per average node
        if cost.plain_s is not None:
            self._learn_costs(cost, rec, width)
        for depth, accepted in zip(rec.depths or rec.drafted, rec.accepted, strict=True):
            for i in range(min(accepted + 1, depth)):  # positions tried: up to the first rejection
                self.acceptance[i] = self._ema(self.acceptance[i], float(i < accepted))
            if 0 < depth == accepted < self.cfg.max_budget:  # the next position was never tried
                self.acceptance[depth] = self._ema(self.acceptance[depth], self.cfg.prior_acceptance)

    def _observe_tree_nodes(self, rec: StepRecord) -> None:
        """A whole tree's average node count; a sequence given none was rejected at position 1 (its step emits the
        target's token alone). Not from a probe: it drafts for one sequence of the batch."""
        if rec.probe:
            return
        self.tree_nodes = self._ema(self.tree_nodes, sum(rec.drafted) / len(rec.drafted))
        for drafted in rec.drafted:
            if drafted == 0:
                self.acceptance[0] = self._ema(self.acceptance[0], 0.0)

    def _learn_costs(self, cost: BatchCost, rec: StepRecord, width: float) -> None:
        def extra(seconds: float) -> float:  # beyond a plain step, in plain steps
            return max(seconds / cost.plain_s - 1.0, 0.0)

        if rec.probe:  # its backlog is part of what a probe costs
            cost.probe_extra = self._ema(cost.probe_extra, extra(rec.seconds + rec.backlog_seconds))
        if rec.timed:
            cost.per_draft = self._ema(cost.per_draft, extra(rec.seconds) / width)
            return
        if rec.verify_seconds is None:
            return
        # Where only some sequences drafted (a probe), the others' rows were not verified: r is per draft of
        # every sequence, and rows cost compute, so the floor scales to the whole batch.
        drafting = max(1, sum(1 for d in rec.drafted if d))
        floor = extra(rec.verify_seconds) / width * len(rec.drafted) / drafting
        if floor > (cost.per_draft or 0.0):
            cost.per_draft = self._ema(cost.per_draft, floor)

    def _cost(self, batch: int) -> BatchCost:
        return self.costs.setdefault(batch, BatchCost())

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.cfg.ema * (new - old)
