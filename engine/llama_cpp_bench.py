"""llama.cpp as `bench decode --compare llama-cpp` runs it: llama-cpp-python (an optional extra, `pip install
optiserve[compare]`) on a GGUF, greedy, one sequence, timed per generated token like our engine's decode steps.

The prompt is given as our tokenizer's ids: the default model's tokenizer was converted from this same GGUF, so
both sides decode from the same tokens.
"""

from __future__ import annotations

import time
from pathlib import Path

from .bench import step_times


class LlamaCppDecoder:
    """One llama.cpp model and context with `threads` threads, room for `n_ctx` tokens."""

    def __init__(self, gguf: Path, threads: int, n_ctx: int):
        try:
            import llama_cpp
        except ImportError:
            raise ValueError("--compare llama-cpp needs llama-cpp-python: pip install 'optiserve[compare]'") from None
        self.path, self.version = gguf, llama_cpp.__version__
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   verbose=False)
        self.model_bytes = int(self.llm._model.size())  # the GGUF's tensor bytes, as llama.cpp holds them

    def generate(self, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
        """Greedy: `tokens` new ids (end-of-text ignored) and the clock after each."""
        self.llm.reset()
        ids, stamps = [], []
        for token in self.llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            ids.append(token)
            stamps.append(time.perf_counter())
            if len(ids) == tokens:
                break
        return ids, stamps

    def time_decode(self, prompt: list[int], tokens: int) -> list[float]:
        """Durations of the decode steps (between consecutive tokens; the prefill before the first is excluded)."""
        return step_times(self.generate(prompt, tokens)[1])
