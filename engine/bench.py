"""Decode benchmark: our engine against HF transformers `generate`, same prompts, dtype and batch, one process
(and, with `--against M`, our engine on another model in the same run: a pruned model against its parent).

Both sides are timed per decode step (the prefill step is excluded): ours by timing each `LLMEngine.step`
after the first (which prefills), HF by a stopping criterion that stamps the clock after every generated token.
Figures use the median step time, so a neighbour briefly stealing a core does not skew them (`tok_s_mean` is
total tokens over total decode time). GB/s counts the weight bytes one decode step reads, lm_head included.
"""

from __future__ import annotations

import json
import statistics
import time
from itertools import pairwise
from pathlib import Path

import torch

from . import ops
from .chat import CHAT_INSTRUCTIONS, chat_prompt_ids
from .config import EngineConfig, SamplingParams
from .llm_engine import LLMEngine, run_to_completion
from .quant import weight_bytes
from .spec.bench import load_prompt_file

WARMUP_TOKENS = 8


def load_instructions(n: int, prompts_file: str | None = None) -> list[str]:
    """The first `n` prompts of `prompts_file` (jsonl with `instruction`, or one per line) or of the built-in chat
    instructions, cycled when there are fewer."""
    pool = load_prompt_file(prompts_file, 0, max(n, 1)) if prompts_file else CHAT_INSTRUCTIONS
    return [pool[i % len(pool)] for i in range(n)]


def step_times(stamps: list[float]) -> list[float]:
    """Durations between consecutive clock stamps."""
    return [b - a for a, b in pairwise(stamps)]


def time_ours(engine: LLMEngine, prompts: list[list[int]], tokens: int) -> list[float]:
    """Durations of the decode-only engine steps (every step after the prefilling first one)."""
    stamps: list[float] = []
    step = engine.step

    def timed_step() -> None:  # intervals start after the first step (prefill + first decode)
        step()
        stamps.append(time.perf_counter())

    engine.step = timed_step  # type: ignore[method-assign]
    try:
        run_to_completion(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    finally:
        del engine.step
    return step_times(stamps)


def time_hf(model, pad_id: int, prompts: list[list[int]], tokens: int) -> list[float]:
    """Durations of HF `generate`'s decode steps (between consecutive generated tokens), left-padded batch."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=tokens, min_new_tokens=tokens,
            pad_token_id=pad_id, stopping_criteria=StoppingCriteriaList([Stamp()]),
        )  # fmt: skip
    return step_times(stamps)


def step_weight_bytes(engine: LLMEngine) -> int:
    """Bytes of weights a decode step reads: all held (lm_head included) but the embedding table."""
    model = engine.runner.model
    return weight_bytes(model)[1] - model.embed.weight.nbytes


def summarize(times: list[float], batch: int, nbytes: int) -> dict:
    """tok/s across the batch, ms per step and weight GB/s from the median decode step; tok/s over the total too."""
    step = statistics.median(times)
    return {
        "tok_s": batch / step, "ms_per_step": 1e3 * step, "gb_s": nbytes / step / 1e9, "steps": len(times),
        "tok_s_mean": batch * len(times) / sum(times),
    }  # fmt: skip


def time_alternating(engines: list[LLMEngine], prompts: list[list[int]], tokens: int,
                     rounds: int = 2) -> list[list[float]]:
    """Decode step times of each engine, the engines taking turns `rounds` times, so drift in the host's memory
    bandwidth during the run hits every engine alike."""
    times: list[list[float]] = [[] for _ in engines]
    for _ in range(rounds):
        for engine, t in zip(engines, times, strict=True):
            t += time_ours(engine, prompts, tokens)
    return times


def bench_decode(
    model: str = "default",
    batch: int = 1,
    tokens: int = 128,
    dtype: str = "float32",
    json_path: str | None = None,
    against: str | None = None,
    prompts_file: str | None = None,
) -> dict:
    """Greedy decode throughput of our engine and of HF `generate` on the same chat prompts; print and return it.
    With `against` (another model, e.g. the unpruned one), our engine on both models in the same run, too.
    Prompts: the first `batch` of `prompts_file`, else the built-in chat instructions."""
    from transformers import AutoModelForCausalLM

    if tokens < 3:
        raise ValueError("tokens must be >= 3 (decode steps are timed after the first)")
    engine = LLMEngine(EngineConfig(model=model, dtype=dtype, max_batch=batch))
    other = against and LLMEngine(EngineConfig(model=against, dtype=dtype, max_batch=batch))
    engines = [engine, other] if other else [engine]
    prompts = chat_prompt_ids(engine.tokenizer, load_instructions(batch, prompts_file))
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=getattr(torch, dtype)).eval()
    tok = engine.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    nbytes = step_weight_bytes(engine)
    for e in engines:
        time_ours(e, prompts, WARMUP_TOKENS)
    times = time_alternating(engines, prompts, tokens)
    ours = summarize(times[0], batch, nbytes)
    time_hf(hf, pad_id, prompts, WARMUP_TOKENS)
    ref = summarize(time_hf(hf, pad_id, prompts, tokens), batch, nbytes)
    result = {
        "model": engine.served_name, "dtype": dtype, "batch": batch, "tokens": tokens, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_kernels": ops.load() is not None,
        "prompt_lens": [len(p) for p in prompts], "weight_bytes": nbytes,
        "ours": ours, "hf": ref, "speedup": ours["tok_s"] / ref["tok_s"],
    }  # fmt: skip
    line = (
        f"{result['model']} {dtype} batch={batch} tokens={tokens}: "
        f"ours {ours['tok_s']:.1f} tok/s ({ours['ms_per_step']:.1f} ms/step, {ours['gb_s']:.1f} GB/s) | "
        f"HF {ref['tok_s']:.1f} tok/s ({ref['ms_per_step']:.1f} ms/step, {ref['gb_s']:.1f} GB/s) | "
        f"{result['speedup']:.2f}x"
    )
    if other:
        other_bytes = step_weight_bytes(other)
        theirs = summarize(times[1], batch, other_bytes)
        result["against"] = {"model": against, "ours": theirs, "weight_bytes": other_bytes}
        result["speedup_vs_against"] = ours["tok_s"] / theirs["tok_s"]
        line += (f" | against {against}: {theirs['tok_s']:.1f} tok/s ({theirs['ms_per_step']:.1f} ms/step), "
                 f"{result['speedup_vs_against']:.2f}x")
    print(line)
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
