"""`optiserve bench spec`: the same prompts plain, with the full draft chain, and with the adaptive budget; greedy.

Per group of `--batch` prompts, the first engine step (prefill + first token) is excluded; decode tok/s is the
rest's tokens over its time, in every mode. τ counts tokens emitted per target forward (the bonus token
included), as EAGLE does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import SamplingParams
from ..llm_engine import LLMEngine
from ..sequence import Request, RequestOutput, SpecStats
from .decoder import SpecDecoder, SpecTiming


def load_prompt_file(path: str, offset: int, count: int) -> list[str]:
    """Prompts from jsonl (`instruction` per row) or plain text (one per line), rows [offset, offset+count)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [json.loads(line)["instruction"] if path.endswith(".jsonl") else line for line in lines]
    picked = rows[offset : offset + count]
    if not picked:
        raise ValueError(f"{path}: no prompts in rows [{offset}, {offset + count})")
    return picked


def timed_decode(engine: LLMEngine, prompts: list[list[int]],
                 max_tokens: int) -> tuple[int, float, int, SpecStats]:
    """Generate greedily for prompts decoded together; (tokens after the first step, seconds they took, engine
    steps they took, speculation counts summed over the prompts)."""
    outs: dict[int, list[RequestOutput]] = {i: [] for i in range(len(prompts))}
    for i, ids in enumerate(prompts):
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
        engine.add_request(Request(f"bench-{i}", ids, params, outs[i].append))
    engine.step()
    count = lambda: sum(len(o.token_ids) for got in outs.values() for out in got for o in out.outputs)  # noqa: E731
    first, steps = count(), 0
    start = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    stats = SpecStats()
    for got in outs.values():
        if got[-1].spec is not None:
            stats.add(got[-1].spec)
    return count() - first, seconds, steps, stats


def conditional_acceptance(stats: SpecStats) -> list[float]:
    """P(position k accepted | position k-1 accepted), position -1 being the draft itself."""
    reached = [stats.drafts, *stats.accepted_per_pos]
    return [round(n / max(prev, 1), 4) for prev, n in zip(reached, reached[1:], strict=False)]


def spec_figures(stats: SpecStats, timing: SpecTiming, base_step: float) -> dict:
    """Acceptance and draft/verify costs of one speculative mode (costs relative to a plain step)."""
    return {
        "mean_acceptance_length": round(stats.mean_acceptance_length, 3),
        "tokens_per_target_forward": round(stats.tokens_per_forward, 3),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "accepted_per_position": [round(n / max(stats.drafts, 1), 4) for n in stats.accepted_per_pos],
        "conditional_acceptance_per_position": conditional_acceptance(stats),
        "draft_step_cost_vs_target_step": round(timing.draft_s / max(timing.draft_tokens, 1) / base_step, 4),
        "verify_cost_vs_target_step": round(timing.verify_s / max(timing.steps, 1) / base_step, 3),
        "steps_drafted": stats.drafts, "steps_skipped": stats.skipped_steps,
    }


def decoding_modes(engine: LLMEngine) -> list[SpecDecoder | None]:
    """Plain decoding, the full draft every step and the adaptive budget, as `engine.spec` values of one engine:
    one copy of the weights and KV cache for all three (engines built one after another in one process decoded
    6-13% apart at batch 8 with the same code, the first built the fastest)."""
    adaptive = engine.spec
    if adaptive is None or adaptive.policy is None:
        raise ValueError("bench spec needs an engine with adaptive speculative decoding")
    return [None, SpecDecoder(adaptive.runner, adaptive.drafter), adaptive]


def bench_spec(engine: LLMEngine, prompts: list[list[int]], max_tokens: int, label: dict,
               json_path: str | None, batch: int = 1) -> dict:
    """Run every group of `batch` prompts in each mode in turn — plain, full draft, adaptive (a warm-up first) —
    and print and write the figures. Top-level figures are the full draft's; `adaptive` the policy's."""
    modes = decoding_modes(engine)
    for mode in modes:
        engine.spec = mode
        timed_decode(engine, prompts[:batch], 8)
    for mode in modes[1:]:
        mode.timing = SpecTiming()  # forget the warm-up
    tok, secs, steps = [0] * len(modes), [0.0] * len(modes), [0] * len(modes)
    stats = [SpecStats() for _ in modes]
    for at in range(0, len(prompts), batch):
        for i, mode in enumerate(modes):  # interleaved: load drift hits every mode alike
            engine.spec = mode
            n, s, k, st = timed_decode(engine, prompts[at : at + batch], max_tokens)
            tok[i], secs[i], steps[i] = tok[i] + n, secs[i] + s, steps[i] + k
            stats[i].add(st)
    engine.spec = modes[-1]
    rate = [t / s for t, s in zip(tok, secs, strict=True)]
    # Seconds per plain decode step, measured: sequences that stop early leave a smaller batch than `batch`.
    base_step = secs[0] / max(steps[0], 1)
    full = spec_figures(stats[1], modes[1].timing, base_step)
    result = {
        **label, "prompts": len(prompts), "max_tokens": max_tokens,
        "base_tok_s": round(rate[0], 2), "spec_tok_s": round(rate[1], 2), "speedup": round(rate[1] / rate[0], 3),
        "plain_step_ms": round(base_step * 1e3, 2),
        **full,
        "adaptive": {"spec_tok_s": round(rate[2], 2), "speedup": round(rate[2] / rate[0], 3),
                     **spec_figures(stats[2], modes[2].timing, base_step)},
    }
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
