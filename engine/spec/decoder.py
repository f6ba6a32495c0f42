"""One speculative step for a batch: draft, verify all drafts in one target forward, accept, roll back."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import EngineConfig, ModelLoadError
from ..runner import ModelRunner
from ..sequence import Sequence
from .draft_head import is_draft_dir, load_draft_head
from .drafters import EagleDrafter, NgramDrafter, Proposal
from .policy import AdaptivePolicy, PolicyConfig, StepRecord
from .verify import accept

Drafter = EagleDrafter | NgramDrafter
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
        self.policy = policy  # None: always draft the full chain
        self.timing = SpecTiming()

    def attach(self, model) -> None:
        """Follow a weight swap: the head reads the new target's embedding (and lets the old one be freed)."""
        if isinstance(self.drafter, EagleDrafter):
            self.drafter.head.attach(model)

    def prefill(self, seq: Sequence, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """The target's prefill, handing the captured features to the drafter."""
        logits, features = self.runner.prefill_features(seq.slot, token_ids, all_logits, self.drafter.capture)
        self.drafter.on_prefill(seq, features)
        return logits

    def step(self, seqs: list[Sequence]) -> list[Accepted]:
        budget = self.policy.budget(seqs) if self.policy else self.drafter.k
        t0 = time.perf_counter()
        proposals = self.drafter.propose(seqs, budget) if budget else [Proposal([], None) for _ in seqs]
        t1 = time.perf_counter()
        width = 1 + max(len(p.tokens) for p in proposals)
        rows = [[s.token_ids[-1], *p.tokens] + [0] * (width - 1 - len(p.tokens))  # [B, W], zero-padded
                for s, p in zip(seqs, proposals, strict=True)]
        starts = [len(s.token_ids) - 1 for s in seqs]
        logits, features = self.runner.verify(rows, starts, self.drafter.capture)  # [B, W, V], [B, W, 3H]
        t2 = time.perf_counter()
        self.timing.add(t1 - t0, t2 - t1, width - 1)
        results, accepted = [], []
        for b, (seq, prop) in enumerate(zip(seqs, proposals, strict=True)):
            k = len(prop.tokens)
            new = accept(prop.tokens, prop.probs, logits[b, : k + 1], seq.params, seq.generator)
            kept = len(new)  # positions of the last old token and the accepted drafts
            # Rejected drafts (and padding) leave the cache as if never written.
            self.runner.cache.truncate(b, starts[b] + kept, starts[b] + width)
            self.drafter.on_verify(seq, None if features is None else features[b, :kept])
            seq.request.spec.record(k, kept - 1)
            accepted.append(kept - 1)
            results.append(Accepted(new, logits[b, :kept]))
        if self.policy:
            self.policy.observe(StepRecord(budget, [len(p.tokens) for p in proposals], accepted, t2 - t0))
        return results



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


def make_spec_decoder(cfg: EngineConfig, runner: ModelRunner, model_dir: Path) -> SpecDecoder | None:
    """The speculative decoder `cfg.speculative` asks for, or None."""
    if cfg.speculative == "none":
        return None
    k = cfg.num_speculative_tokens
    policy = AdaptivePolicy(PolicyConfig(k)) if cfg.speculative_adaptive else None
    if cfg.speculative == "ngram":
        return SpecDecoder(runner, NgramDrafter(k), policy)
    path = resolve_head_dir(cfg.speculative, cfg.model, model_dir)
    if not is_draft_dir(path):
        raise ModelLoadError(f"--speculative {cfg.speculative}: {path} is not a draft head directory")
    dtype = runner.cache.k.dtype
    head = load_draft_head(path, dtype).to(runner.device).attach(runner.model)
    drafter = EagleDrafter(head, k, runner.cache.shape.num_slots, runner.cache.shape.max_len, dtype)
    return SpecDecoder(runner, drafter, policy)
