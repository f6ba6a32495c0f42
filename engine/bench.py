"""Decode benchmark: our engine against HF transformers `generate`, same prompts, dtype and batch, one process
(and, with `--against M`, our engine on another model in the same run: a pruned model against its parent; with
`--compare llama-cpp`, llama.cpp on the default model's own GGUF). The sides take turns, round after round.

Both sides are timed per decode step (the prefill step is excluded): ours by timing each `LLMEngine.step`
after the first (which prefills), HF by a stopping criterion that stamps the clock after every generated token.
Figures use the median step time, so a neighbour briefly stealing a core does not skew them (`tok_s_mean` is
total tokens over total decode time). GB/s counts the weight bytes one decode step reads, lm_head included;
`resident_bytes` the weight bytes each side holds.
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path

import torch

from . import ops
from .chat import CHAT_INSTRUCTIONS, chat_prompt_ids
from .config import EngineConfig, SamplingParams
from .llm_engine import LLMEngine, run_to_completion
from .quant import weight_bytes
from .spec.bench import load_prompt_file
from .weights import default_gguf_path

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
    """Durations of the engine steps in which every sequence decodes: none has a prompt left to compute (prefill
    steps, whole or chunked, are not timed) and none has finished."""
    durations: list[float] = []
    step = engine.step

    def timed_step() -> None:
        running = engine.scheduler.running
        decoding = len(running) == len(prompts) and all(s.num_generated > 0 for s in running)
        start = time.perf_counter()
        step()
        if decoding:
            durations.append(time.perf_counter() - start)

    engine.step = timed_step  # type: ignore[method-assign]
    try:
        run_to_completion(engine, prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True))
    finally:
        del engine.step
    return durations


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


def summarize(times: list[float], batch: int, nbytes: int, resident: int) -> dict:
    """tok/s across the batch, ms per step and weight GB/s (`nbytes` read a step) from the median decode step;
    tok/s over the total too, and the weight bytes the side holds (`resident`)."""
    step = statistics.median(times)
    return {
        "tok_s": batch / step, "ms_per_step": 1e3 * step, "gb_s": nbytes / step / 1e9, "steps": len(times),
        "tok_s_mean": batch * len(times) / sum(times), "step_weight_bytes": nbytes, "resident_bytes": resident,
    }  # fmt: skip


def time_alternating(timers: list[Callable[[int], list[float]]], tokens: int, rounds: int = 2) -> list[list[float]]:
    """Decode step times of each timer (our engine, HF, llama.cpp...), taking turns `rounds` times, so drift in the
    host's memory bandwidth during the run hits every side alike."""
    times: list[list[float]] = [[] for _ in timers]
    for _ in range(rounds):
        for timer, t in zip(timers, times, strict=True):
            t += timer(tokens)
    return times


@dataclass
class DecodeBench:
    """What `bench decode` runs: our engine (in a weight / KV / LM-head format) beside HF `generate`, optionally
    another model of ours (`against`) and llama.cpp on the default model's GGUF (`compare="llama-cpp"`)."""

    model: str = "default"
    batch: int = 1
    tokens: int = 128
    dtype: str = "float32"
    lm_head_dtype: str = "float32"
    against: str | None = None
    compare: str | None = None
    prompts_file: str | None = None
    rounds: int = 2
    label: dict = field(default_factory=dict)  # the formats applied by `prepare`, reported as given

    def __post_init__(self) -> None:
        if self.tokens < 3:
            raise ValueError("tokens must be >= 3 (decode steps are timed after the first)")
        if self.compare not in (None, "llama-cpp"):
            raise ValueError(f"--compare takes llama-cpp, not {self.compare!r}")
        if self.compare and (self.batch != 1 or self.model != "default"):
            raise ValueError("--compare llama-cpp runs batch 1 on the default model (its GGUF)")


def hf_resident_bytes(model) -> int:
    """Bytes of an HF model's parameters, a tied tensor counted once."""
    return sum({p.data_ptr(): p.nbytes for p in model.parameters()}.values())


def bench_decode(cfg: DecodeBench, json_path: str | None = None,
                 prepare: Callable[[LLMEngine], None] | None = None,
                 also: dict[str, Callable[[LLMEngine], None]] | None = None) -> dict:
    """Greedy decode throughput of our engine (after `prepare`, e.g. PTQ), HF `generate` and, as `cfg` asks,
    another model of ours and llama.cpp, on the same chat prompts in alternating rounds; print and return it.
    `also`: more sides of our engine on `cfg.model`, each made by its own `prepare` (other formats), as `ours_<name>`.
    Prompts: the first `batch` of `cfg.prompts_file`, else the built-in chat instructions."""
    from transformers import AutoModelForCausalLM

    def new_engine(model: str) -> LLMEngine:
        return LLMEngine(EngineConfig(model=model, dtype=cfg.dtype, max_batch=cfg.batch,
                                      lm_head_dtype=cfg.lm_head_dtype))

    engines = {"ours": new_engine(cfg.model)}
    if cfg.against:
        engines["against"] = new_engine(cfg.against)
    engines |= {f"ours_{k}": new_engine(cfg.model) for k in also or {}}
    for name, prep in [("ours", prepare), *((f"ours_{k}", p) for k, p in (also or {}).items())]:
        if prep:
            prep(engines[name])
    engine = engines["ours"]
    prompts = chat_prompt_ids(engine.tokenizer, load_instructions(cfg.batch, cfg.prompts_file))
    hf = AutoModelForCausalLM.from_pretrained(engine.model_dir, dtype=getattr(torch, cfg.dtype)).eval()
    tok = engine.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    timers = {name: functools.partial(time_ours, e, prompts) for name, e in engines.items()}
    timers["hf"] = functools.partial(time_hf, hf, pad_id, prompts)
    llama = None
    if cfg.compare:
        from .llama_cpp_bench import LlamaCppDecoder

        llama = LlamaCppDecoder(default_gguf_path(), torch.get_num_threads(), len(prompts[0]) + cfg.tokens + 8)
        timers["llama_cpp"] = functools.partial(llama.time_decode, prompts[0])
    for timer in timers.values():
        timer(WARMUP_TOKENS)
    times = dict(zip(timers, time_alternating(list(timers.values()), cfg.tokens, cfg.rounds), strict=True))
    sides = {name: summarize(times[name], cfg.batch, step_weight_bytes(e), e.weight_bytes())
             for name, e in engines.items()}
    hf_bytes = hf_resident_bytes(hf)
    sides["hf"] = summarize(times["hf"], cfg.batch, hf_bytes - hf.get_input_embeddings().weight.nbytes, hf_bytes)
    if llama:  # a tied GGUF reads its token embedding as the output matrix: every byte, every step
        sides["llama_cpp"] = summarize(times["llama_cpp"], 1, llama.model_bytes, llama.model_bytes)
    result = {
        "model": engine.served_name, "dtype": cfg.dtype, "lm_head_dtype": cfg.lm_head_dtype, **cfg.label,
        "batch": cfg.batch, "tokens": cfg.tokens, "rounds": cfg.rounds, "torch": torch.__version__,
        "threads": torch.get_num_threads(), "cpu_kernels": ops.load() is not None,
        "prompt_lens": [len(p) for p in prompts],
        "kv_bytes_per_token": engine.runner.cache.bytes_per_token, "kv_resident_bytes": engine.runner.cache.nbytes,
        **sides,
        "speedup": {k: sides["ours"]["tok_s"] / v["tok_s"] for k, v in sides.items() if k != "ours"},
    }  # fmt: skip
    if llama:
        result["llama_cpp"] |= {"gguf": llama.path.name, "version": llama.version}
    print(" | ".join(f"{k} {v['tok_s']:.1f} tok/s ({v['ms_per_step']:.1f} ms/step, {v['gb_s']:.1f} GB/s, "
                     f"{v['resident_bytes'] / 1e6:.0f} MB)" for k, v in sides.items())
          + " | ours/" + ", ours/".join(f"{k} {x:.2f}x" for k, x in result["speedup"].items()))
    if json_path:
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
