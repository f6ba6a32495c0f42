"""One speculative step for a batch: draft, verify all drafts in one target forward, accept, roll back."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DEFAULT_CHAIN, EngineConfig, ModelLoadError
from ..runner import ModelRunner
from ..sampler import argmax
from ..sequence import Sequence
from ..tree_attention import depths
from .draft_head import is_draft_dir, load_draft_head, with_serving_linears
from .drafters import EagleDrafter, NgramDrafter, Proposal
from .policy import AdaptivePolicy, PolicyConfig, StepRecord
from .tree_drafter import EagleTreeDrafter
from .verify import accept, accept_tree_greedy

Drafter = EagleDrafter | EagleTreeDrafter | NgramDrafter
DEFAULT_HEAD_NAME = "smollm2-135m-instruct"


@dataclass
class SpecTiming:
    """Seconds spent drafting and verifying (what `bench spec` reports as the cost of a draft step)."""

    steps: int = 0
    draft_s: float = 0.0
    verify_s: float = 0.0
    draft_tokens: int = 0

    def add(self, draft_s: float, verify_s: float, width: int) -> None:
        self.steps += 1
        self.draft_s += draft_s
        self.verify_s += verify_s
        self.draft_tokens += width


@dataclass
class Accepted:
    """What a verification gave one sequence: its new tokens and the target's logits for each [m, V]."""

    tokens: list[int]
    logits: torch.Tensor


class SpecDecoder:
    """Drafts with `drafter`, verifies with the target through `runner`; sequences are in slots [0, B)."""

    def __init__(self, runner: ModelRunner, drafter: Drafter, policy: AdaptivePolicy | None = None):
        self.runner = runner
        self.drafter = drafter
        self.policy = policy  # None: always draft the full chain or tree
        self.timing = SpecTiming()
        self.clock: Callable[[], float] = time.perf_counter  # what the policy and `timing` time steps with

    def attach(self, model) -> None:
        """Follow a weight swap: the head reads the new target's embedding (and lets the old one be freed)."""
        if isinstance(self.drafter, EagleDrafter):
            self.drafter.head.attach(model)

    def prefill(self, seq: Sequence, token_ids: list[int], all_logits: bool = False, start: int = 0) -> torch.Tensor:
        """The target's prefill from `start` (a drafter reading features gets 0: no prefix caching), handing the
        captured features to the drafter."""
        logits, features = self.runner.prefill_features(seq.slot, token_ids, all_logits, self.drafter.capture,
                                                         start)
        self.drafter.on_prefill(seq, features)
        return logits

    def step(self, seqs: list[Sequence]) -> list[Accepted]:
        budget, probing = self._budget(seqs)
        rows = self._drafting_rows(seqs, probing) if budget else []
        t_backlog = self.clock()
        read = self.drafter.read_backlog([seqs[b] for b in rows])  # a cost of having skipped, not of this draft's
        backlog_s = self.clock() - t_backlog if read else 0.0
        # Before proposing (that reads the backlog); a step where only some draft is no draft's cost either.
        steady = self.drafter.steady(seqs) and len(rows) == len(seqs)
        t0 = self.clock()
        proposals = [Proposal([], None) for _ in seqs]
        for b, prop in zip(rows, self.drafter.propose([seqs[b] for b in rows], budget) if rows else [], strict=True):
            proposals[b] = prop
        t1 = self.clock()
        if not rows:
            results = self._decode(seqs)
        else:
            verify = self._verify_tree if self._as_trees(proposals) else self._verify_chain
            results = verify(seqs, proposals, t1 - t0)
        if self.policy:  # a tree counts as a chain as deep as its deepest node: nodes drafted, path kept
            t2 = self.clock()
            self.policy.observe(StepRecord(budget, [len(p.tokens) for p in proposals],
                                           [len(r.tokens) - 1 for r in results], t2 - t0,
                                           [draft_depth(p) for p in proposals], steady, probing, t2 - t1,
                                           backlog_s))
        return results

    def _budget(self, seqs: list[Sequence]) -> tuple[int, bool]:
        """Draft tokens per sequence this step, and whether the policy asks them as a probe. A seeded sampled
        request must repeat run to run, and its rejection sampling draws per draft: the number of drafts may not
        depend on measured timings, so a batch holding one drafts the full budget."""
        seeded = any(s.params.seed is not None and not s.params.greedy for s in seqs)
        if self.policy is None or seeded:
            return self.drafter.max_draft_tokens, False
        return self.policy.budget(seqs), self.policy.probing

    def _drafting_rows(self, seqs: list[Sequence], probing: bool) -> list[int]:
        """Which sequences draft this step: all, or on a probe the one with the least backlog: the head's catch-up
        on skipped steps is most of a probe's cost at batch > 1, and one sequence's acceptance is what it measures."""
        if not probing:
            return list(range(len(seqs)))
        return [min(range(len(seqs)), key=lambda b: self.drafter.backlog(seqs[b]))]

    def _decode(self, seqs: list[Sequence]) -> list[Accepted]:
        """A step that drafts for no sequence: the target's decode step, its features handed to the drafter (at
        batch 8 a one-row verify's padding, rollback and per-row slicing cost 1-3% of a step)."""
        logits, features = self.runner.decode_features([s.token_ids[-1] for s in seqs],
                                                        [len(s.token_ids) - 1 for s in seqs],
                                                        self.drafter.capture)  # [B, V], [B, 1, 3H]
        best = argmax(logits).tolist()  # [B]
        results = []
        for b, seq in enumerate(seqs):
            new = accept([], None, logits[b : b + 1], seq.params, seq.generator, best[b : b + 1])
            self.drafter.on_verify(seq, None if features is None else features[b])
            seq.request.spec.record(0, 0)
            results.append(Accepted(new, logits[b : b + 1]))
        return results

    def _verify_chain(self, seqs: list[Sequence], proposals: list[Proposal], draft_s: float) -> list[Accepted]:
        """Verify draft chains (last token + drafts, zero-padded) in one target forward; keep each accepted prefix."""
        t0 = self.clock()
        width = 1 + max(len(p.tokens) for p in proposals)
        rows = [[s.token_ids[-1], *p.tokens] + [0] * (width - 1 - len(p.tokens))  # [B, W], zero-padded
                for s, p in zip(seqs, proposals, strict=True)]
        starts = [len(s.token_ids) - 1 for s in seqs]
        logits, features = self.runner.verify(rows, starts, self.drafter.capture)  # [B, W, V], [B, W, 3H]
        self.timing.add(draft_s, self.clock() - t0, width - 1)
        best = argmax(logits).tolist()  # [B, W] in one call: a call per row costs more than it computes
        results = []
        for b, (seq, prop) in enumerate(zip(seqs, proposals, strict=True)):
            k = len(prop.tokens)
            new = accept(prop.tokens, prop.probs, logits[b, : k + 1], seq.params, seq.generator, best[b][: k + 1])
            kept = len(new)  # positions of the last old token and the accepted drafts
            # Rejected drafts (and padding) leave the cache as if never written.
            self.runner.cache.truncate(b, starts[b] + kept, starts[b] + width)
            self.drafter.on_verify(seq, None if features is None else features[b, :kept])
            seq.request.spec.record(k, kept - 1)
            results.append(Accepted(new, logits[b, :kept]))
        return results

    def _as_trees(self, proposals: list[Proposal]) -> bool:
        """Whether to verify as trees: drafted as trees, or chains of different lengths (a probe drafts for one
        sequence) that a ragged verify scores without padding rows."""
        return any(p.parents is not None for p in proposals) or (
            len({len(p.tokens) for p in proposals}) > 1 and self._ragged())

    def _ragged(self) -> bool:
        """Whether trees of different sizes are verified one row per node: where the attention kernel reads the
        cache in place (elsewhere each row would gather its sequence's cache) and the model has no sliding window
        (tree masks have none)."""
        return self.runner.unmasked_decode and not self.runner.model.cfg.sliding_window

    def _verify_tree(self, seqs: list[Sequence], proposals: list[Proposal], draft_s: float) -> list[Accepted]:
        """Verify draft trees (root + nodes) in one target forward with a tree mask, keep each accepted path."""
        t0 = self.clock()
        trees = [VerifyTree.of(s.token_ids[-1], p) for s, p in zip(seqs, proposals, strict=True)]
        starts = [len(s.token_ids) - 1 for s in seqs]
        logits, features = self._score_trees(trees, starts)  # per sequence [W_b, V], [W_b, 3H] or None
        self.timing.add(draft_s, self.clock() - t0, max(len(t.tokens) for t in trees) - 1)
        results = []
        for b, (seq, prop, tree) in enumerate(zip(seqs, proposals, trees, strict=True)):
            if seq.params.greedy:
                new, path = accept_tree_greedy(tree.tokens, tree.parents, logits[b])
            else:  # the tree drafter gives sampled requests a chain: rows 0..k in order
                new = accept(prop.tokens, prop.probs, logits[b][: len(prop.tokens) + 1], seq.params, seq.generator)
                path = list(range(len(new)))
            self.runner.cache.keep_path(b, starts[b], path, starts[b] + len(tree.tokens))
            self.drafter.on_verify(seq, None if features[b] is None else features[b][path])
            seq.request.spec.record(len(prop.tokens), len(path) - 1)
            results.append(Accepted(new, logits[b][path]))
        return results

    def _score_trees(self, trees: list[VerifyTree], starts: list[int]) -> tuple[list, list]:
        """Each tree's logits and captured features from one target forward: one row per node where sizes differ
        and `_ragged` allows, else as a [B, W] batch padded to the widest."""
        sizes = [len(t.tokens) for t in trees]
        capture = self.drafter.capture
        if len(set(sizes)) > 1 and self._ragged():
            logits, features = self.runner.verify_ragged([t.tokens for t in trees], starts,
                                                         [t.parents for t in trees], capture)  # [T, V], [T, 3H]
            return list(logits.split(sizes)), [None] * len(trees) if features is None else list(features.split(sizes))
        trees = [t.padded(max(sizes)) for t in trees]
        logits, features = self.runner.verify_tree([t.tokens for t in trees], starts, [t.parents for t in trees],
                                                   capture)  # [B, W, V], [B, W, 3H]
        return list(logits), [None] * len(trees) if features is None else list(features)


@dataclass
class VerifyTree:
    """One sequence's verify rows: the root (its last token) then the draft nodes; `parents` index rows (-1: the
    root's)."""

    tokens: list[int]
    parents: list[int]

    @classmethod
    def of(cls, last_token: int, prop: Proposal) -> VerifyTree:
        node_parents = prop.parents if prop.parents is not None else list(range(-1, len(prop.tokens) - 1))
        return cls([last_token, *prop.tokens], [-1, *(p + 1 for p in node_parents)])

    def padded(self, width: int) -> VerifyTree:
        """Padded to `width` rows with roots of their own (a padding row attends the prefix and itself)."""
        n = width - len(self.tokens)
        return VerifyTree(self.tokens + [0] * n, self.parents + [-1] * n)


def draft_depth(prop: Proposal) -> int:
    """How many positions past the last token a proposal reaches (a chain: its length)."""
    if prop.parents is None:
        return len(prop.tokens)
    return 1 + max(depths(prop.parents), default=-1)


def shipped_head_dir() -> Path:
    """The draft head committed for the default model (see its README.md model card)."""
    return Path(__file__).parent / "heads" / DEFAULT_HEAD_NAME


def resolve_head_dir(speculative: str, model: str, model_dir: Path) -> Path:
    """`auto`: the shipped head for the default model, else a `draft_head/` dir beside the model; or a path."""
    if speculative != "auto":
        return Path(speculative)
    candidates = [shipped_head_dir()] if model == "default" else [model_dir / "draft_head"]
    for path in candidates:
        if is_draft_dir(path):
            return path
    raise ModelLoadError(f"--speculative auto: no draft head for {model} (looked in {candidates[0]}); train one "
                         "with `optiserve train-draft` and pass its directory, or use --speculative ngram")


def adaptive_policy(cfg: EngineConfig, drafter: Drafter) -> AdaptivePolicy | None:
    """The per-step draft budget (up to the drafter's most draft tokens), unless `--no-speculative-adaptive`."""
    whole = isinstance(drafter, EagleTreeDrafter)
    return AdaptivePolicy(PolicyConfig(drafter.max_draft_tokens, whole=whole)) if cfg.speculative_adaptive else None


def make_spec_decoder(cfg: EngineConfig, runner: ModelRunner, model_dir: Path) -> SpecDecoder | None:
    """The speculative decoder `cfg.speculative` asks for, or None."""
    if cfg.speculative == "none":
        return None
    k = cfg.num_speculative_tokens
    if cfg.speculative == "ngram":
        drafter = NgramDrafter(k)
        return SpecDecoder(runner, drafter, adaptive_policy(cfg, drafter))
    path = resolve_head_dir(cfg.speculative, cfg.model, model_dir)
    if not is_draft_dir(path):
        raise ModelLoadError(f"--speculative {cfg.speculative}: {path} is not a draft head directory")
    dtype = runner.cache.dtype
    head = load_draft_head(path, dtype).to(runner.device)
    head = with_serving_linears(head, cfg.speculative_draft_dtype).attach(runner.model)
    tables = runner.cache.tables
    window = runner.model.cfg.sliding_window
    if cfg.tree and window and not cfg.default_tree:
        raise ModelLoadError("a draft tree needs a model without a sliding window; use --speculative-eagle-topk 1")
    if not cfg.tree or window:  # tree masks have no window: the default tree becomes the default chain
        drafter = EagleDrafter(head, DEFAULT_CHAIN["num_speculative_tokens"] if cfg.tree else k, tables, dtype)
    else:
        drafter = EagleTreeDrafter(head, k, cfg.speculative_eagle_topk, cfg.speculative_num_draft_tokens, tables,
                                   dtype, cfg.speculative_ngram_branch, cfg.speculative_min_prob)
    return SpecDecoder(runner, drafter, adaptive_policy(cfg, drafter))

