"""`optiserve bench spec`: the same prompts with and without speculation, one process, batch 1, greedy.

Per prompt, the first engine step (prefill + first token) is excluded; decode tok/s is the rest's tokens over
its time, on both sides. τ counts tokens emitted per target forward (the bonus token included), as EAGLE does.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..config import SamplingParams
from ..llm_engine import LLMEngine
from ..sequence import Request, RequestOutput, SpecStats
from .decoder import SpecTiming


def load_prompt_file(path: str, offset: int, count: int) -> list[str]:
    """Prompts from jsonl (`instruction` per row) or plain text (one per line), rows [offset, offset+count)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    rows = [json.loads(line)["instruction"] if path.endswith(".jsonl") else line for line in lines]
    picked = rows[offset : offset + count]
    if not picked:
        raise ValueError(f"{path}: no prompts in rows [{offset}, {offset + count})")
    return picked


def timed_decode(engine: LLMEngine, prompt: list[int], max_tokens: int) -> tuple[int, float, SpecStats | None]:
    """Generate greedily for one prompt; (tokens after the first step, seconds they took, speculation counts)."""
    outs: list[RequestOutput] = []
    engine.add_request(Request("bench", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), outs.append))
    engine.step()
    first = sum(len(o.token_ids) for out in outs for o in out.outputs)
    start = time.perf_counter()
    while engine.scheduler.has_work():
        engine.step()
    seconds = time.perf_counter() - start
    total = sum(len(o.token_ids) for out in outs for o in out.outputs)
    return total - first, seconds, outs[-1].spec


def conditional_acceptance(stats: SpecStats) -> list[float]:
    """P(position k accepted | position k-1 accepted), position -1 being the draft itself."""
    reached = [stats.drafts, *stats.accepted_per_pos]
    return [round(n / max(prev, 1), 4) for prev, n in zip(reached, reached[1:], strict=False)]


def bench_spec(base: LLMEngine, spec: LLMEngine, prompts: list[list[int]], max_tokens: int, label: dict,
               json_path: str | None) -> dict:
    """Run every prompt on `base` then on `spec` (warm-up prompt first); print and write the figures."""
    timed_decode(base, prompts[0], 8)
    timed_decode(spec, prompts[0], 8)
    spec.spec.timing = SpecTiming()  # forget the warm-up
    base_tok = base_s = spec_tok = spec_s = 0.0
    stats = SpecStats()
    for ids in prompts:
        n, s, _ = timed_decode(base, ids, max_tokens)
        base_tok, base_s = base_tok + n, base_s + s
        n, s, st = timed_decode(spec, ids, max_tokens)
        spec_tok, spec_s = spec_tok + n, spec_s + s
        stats.add(st)
    t = spec.spec.timing
    base_step = base_s / max(base_tok, 1)  # seconds per target one-token step
    result = {
        **label, "prompts": len(prompts), "max_tokens": max_tokens,
        "base_tok_s": round(base_tok / base_s, 2), "spec_tok_s": round(spec_tok / spec_s, 2),
        "speedup": round((spec_tok / spec_s) / (base_tok / base_s), 3),
        "mean_acceptance_length": round(stats.mean_acceptance_length, 3),
        "acceptance_rate": round(stats.acceptance_rate, 4),
        "accepted_per_position": [round(n / max(stats.drafts, 1), 4) for n in stats.accepted_per_pos],
        "conditional_acceptance_per_position": conditional_acceptance(stats),
        "draft_step_cost_vs_target_step": round(t.draft_s / max(t.draft_tokens, 1) / base_step, 4),
        "verify_cost_vs_target_step": round(t.verify_s / max(t.steps, 1) / base_step, 3),
    }
    print(json.dumps(result, indent=2))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
