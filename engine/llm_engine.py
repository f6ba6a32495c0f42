"""The engine: one thread owns the model and runs scheduler steps; callers submit requests and get outputs."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass, field

import torch

from .config import EngineConfig, ModelConfig, SamplingParams
from .detokenize import finish_reason_for_token, text_delta, update_text
from .kv_quant import KVFormat
from .model import Transformer
from .quant import weight_bytes
from .quantized_checkpoint import is_modelopt_checkpoint, load_quantized_checkpoint
from .runner import ModelRunner
from .sampler import make_generator, sample, token_logprobs
from .scheduler import Scheduler
from .sequence import Request, RequestOutput, SeqOutput, Sequence
from .spec.decoder import Accepted, make_spec_decoder
from .weights import default_served_name, load_model, resolve_model_dir

log = logging.getLogger(__name__)


def release_freed_memory() -> None:
    """Collect the dropped weight set and hand freed heap pages back to the OS (glibc keeps them otherwise,
    so resident memory would grow by a weight set per swap)."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


class RequestError(ValueError):
    """A request the engine cannot run (e.g. longer than the context); the server answers 400."""


@dataclass
class WeightSet:
    """The model the engine serves and the formats it is in."""

    model: Transformer
    weight_format: str
    kv: KVFormat = field(default_factory=KVFormat)

    @property
    def kv_format(self) -> str:
        return self.kv.name


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float


class LLMEngine:
    """Loads a model and serves generation requests with continuous batching.

    `add_request` and `abort` are thread-safe. Either call `start()` to run steps on a background thread,
    or drive `step()` yourself (benchmarks and tests do).
    """

    def __init__(self, cfg: EngineConfig):
        from transformers import AutoTokenizer

        self.cfg = cfg
        self.model_dir = resolve_model_dir(cfg.model)
        self.served_name = default_served_name(cfg.model, self.model_dir)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.max_model_len = min(cfg.max_model_len, self.model_config.max_position_embeddings)
        dtype = getattr(torch, cfg.dtype)
        torch.manual_seed(cfg.seed)
        # Verification writes up to k draft positions past a sequence's end before rolling back: room for them.
        cache_len = self.max_model_len + (cfg.num_speculative_tokens + 1 if cfg.speculative != "none" else 0)
        quantized = None
        if is_modelopt_checkpoint(self.model_dir):  # served as packed; no unquantized master copy exists
            quantized = load_quantized_checkpoint(self.model_dir, cache_len, dtype, cfg.device)
            model = quantized.model
        else:
            model = load_model(self.model_dir, cache_len, dtype, cfg.device)
        self.master: Transformer | None = None if quantized else model  # unquantized weights, for format swaps
        self.runner = ModelRunner(model, cfg.max_batch, cache_len, dtype)
        self.spec = make_spec_decoder(cfg, self.runner, self.model_dir)
        spec_caches = self.spec.drafter.caches if self.spec else ()
        self.scheduler = Scheduler(cfg.max_batch, [self.runner.cache, *spec_caches])
        self.eos_ids = set(self.model_config.eos_token_ids) | {self.tokenizer.eos_token_id} - {None}
        self._new: queue.SimpleQueue[Request] = queue.SimpleQueue()  # filled by callers, drained by the loop
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._swaps: queue.SimpleQueue[tuple[WeightSet, threading.Event]] = queue.SimpleQueue()
        self.weights = WeightSet(model, "none")
        if quantized is not None:
            self._apply_weights(WeightSet(model, quantized.weight_format, quantized.kv))
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public API -------------------------------------------------------------------------------
    def check_request(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validate lengths; return the effective max_tokens (default: the rest of the context)."""
        if prompt_len == 0:
            raise RequestError("the prompt is empty")
        room = self.max_model_len - prompt_len
        if room < 0 or (max_tokens is None and room == 0):
            raise RequestError(
                f"the prompt has {prompt_len} tokens, more than the model's context of {self.max_model_len}"
            )
        if max_tokens is not None and max_tokens > room:
            raise RequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                f"{self.max_model_len} tokens"
            )
        return room if max_tokens is None else max_tokens

    def add_request(self, request: Request) -> None:
        """Queue a request (thread-safe). Its `emit` callback is called from the engine thread."""
        self.check_request(len(request.prompt_ids), request.params.max_tokens)
        self._new.put(request)
        self._wake.set()

    def abort(self, request_id: str) -> None:
        """Stop a request and free its KV slots at the next step boundary (thread-safe)."""
        self._aborts.put(request_id)
        self._wake.set()

    def use_weights(self, weights: WeightSet, timeout_s: float = 600.0) -> None:
        """Serve from `weights` from the next step on; returns once they serve (thread-safe).

        Sequences already running are re-prefilled on the new weights at the switch, so none is dropped and
        every token after the switch comes from the new weight set.
        """
        if self._thread is None or not self._thread.is_alive():
            self._apply_weights(weights)
            return
        done = threading.Event()
        self._swaps.put((weights, done))
        self._wake.set()
        if not done.wait(timeout_s):
            raise TimeoutError("the engine did not switch weights in time")

    def _apply_weights(self, weights: WeightSet) -> None:
        old, self.weights = self.weights, weights
        self.runner.model = weights.model
        self.runner.cache.set_format(weights.kv)
        if self.spec:
            self.spec.attach(weights.model)
        for seq in self.scheduler.running:
            if seq.finish_reason is None and seq.num_generated > 0:
                self._run_prefill(seq, seq.token_ids[:-1])  # the last token is fed by the next decode
        del old
        release_freed_memory()

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as held in memory (a tied LM head's transposed copy included)."""
        return weight_bytes(self.weights.model)[1]

    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(len(s.running), len(s.waiting) + self._new.qsize(), s.kv_usage())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="optiserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping:
            self._drain_inbox()
            if not self.scheduler.has_work():
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as e:  # never let one bad step kill the server: fail the batch, go on
                log.exception("engine step failed")
                self._fail_all(f"engine error: {e}")

    def _drain_inbox(self) -> None:
        """Switch weights if asked, take in new requests, then apply aborts (an abort follows its add)."""
        while not self._swaps.empty():
            weights, done = self._swaps.get_nowait()
            self._apply_weights(weights)
            done.set()
        while not self._new.empty():
            self._enqueue(self._new.get_nowait())
        while not self._aborts.empty():
            for seq in self.scheduler.sequences_of(self._aborts.get_nowait()):
                self.scheduler.release(seq)

    def _enqueue(self, request: Request) -> None:
        p = request.params
        max_tokens = self.check_request(len(request.prompt_ids), p.max_tokens)
        for i in range(p.n):
            gen = make_generator(p.seed, i)
            self.scheduler.add(Sequence(request, i, list(request.prompt_ids), max_tokens, gen))

    def _fail_all(self, message: str) -> None:
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            self.scheduler.release(seq)
            req = seq.request
            req.emit(RequestOutput(req.request_id, [], req.prompt_ids, finished=True, error=message))

    def step(self) -> None:
        """One scheduler step: prefill newly admitted sequences, then one decode for all running ones."""
        self._drain_inbox()
        for seq in self.scheduler.admit():
            self._prefill(seq)
        self._release_finished()  # so the running sequences are exactly slots [0, B)
        running = self.scheduler.running
        if running and self.spec:
            self._append(running, self.spec.step(running))
        elif running:
            logits = self.runner.decode([s.token_ids[-1] for s in running], [len(s.token_ids) - 1 for s in running])
            # On a GPU too: seeded requests draw from per-sequence CPU generators, so samples repeat across devices
            self._sample_and_append(running, logits.cpu())
        self._release_finished()

    def _release_finished(self) -> None:
        for seq in [s for s in self.scheduler.running if s.finish_reason is not None]:
            self.scheduler.release(seq)

    def _run_prefill(self, seq: Sequence, token_ids: list[int], all_logits: bool = False) -> torch.Tensor:
        if self.spec:
            return self.spec.prefill(seq, token_ids, all_logits)
        return self.runner.prefill(seq.slot, token_ids, all_logits).cpu()  # sampling runs on the CPU (see step)

    def _prefill(self, seq: Sequence) -> None:
        req = seq.request
        if req.first_scheduled is None:
            req.first_scheduled = time.monotonic()
        want_prompt_lp = req.params.prompt_logprobs is not None and seq.index == 0
        logits = self._run_prefill(seq, seq.token_ids, all_logits=want_prompt_lp)
        if want_prompt_lp:
            lps = token_logprobs(logits[:-1], req.prompt_ids[1:], req.params.prompt_logprobs or 0)
            req.prompt_logprobs = [None, *lps]
            logits = logits[-1]
        if seq.max_tokens == 0:  # echo-only (scoring) requests generate nothing
            seq.finish_reason = "length"
            self._emit(req, [seq])
            return
        self._sample_and_append([seq], logits.unsqueeze(0))

    def _sample_and_append(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        """Sample one token for each sequence from `logits` [B, V] and append it."""
        tokens = sample(logits, [s.params for s in seqs], [s.generator for s in seqs])
        self._append(seqs, [Accepted([t], logits[row : row + 1]) for row, t in enumerate(tokens)])

    def _append(self, seqs: list[Sequence], results: list[Accepted]) -> None:
        """Append each sequence's new tokens up to the first stop, update text, report per request."""
        for seq, res in zip(seqs, results, strict=True):
            for i, tok in enumerate(res.tokens):
                seq.token_ids.append(tok)
                if seq.params.logprobs is not None:
                    seq.pending_logprobs += token_logprobs(res.logits[i : i + 1], [tok], seq.params.logprobs)
                reason = finish_reason_for_token(seq, tok, self.eos_ids, self.max_model_len)
                update_text(seq, self.tokenizer, reason)
                if seq.finish_reason is not None:
                    break
        by_request: dict[str, list[Sequence]] = {}
        for seq in seqs:
            by_request.setdefault(seq.request.request_id, []).append(seq)
        for group in by_request.values():
            self._emit(group[0].request, group)

    def _emit(self, req: Request, seqs: list[Sequence]) -> None:
        outs = []
        for seq in seqs:
            new_ids = seq.generated_ids[seq.sent_tokens :]
            seq.sent_tokens = seq.num_generated
            logprobs, seq.pending_logprobs = seq.pending_logprobs, []
            outs.append(SeqOutput(seq.index, new_ids, text_delta(seq), logprobs, seq.finish_reason))
            if seq.finish_reason is not None:
                req.num_finished += 1
        finished = req.num_finished == req.params.n
        spec = req.spec.snapshot() if self.spec else None
        req.emit(RequestOutput(req.request_id, outs, req.prompt_ids, req.prompt_logprobs, finished, spec=spec))


def run_to_completion(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    """Generate for all prompts at once on the calling thread (benchmarks, tests); returns new token ids."""
    results: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}

    def collect(out: RequestOutput) -> None:
        for o in out.outputs:
            results[out.request_id] += o.token_ids

    for i, ids in enumerate(prompts):
        engine.add_request(Request(str(i), ids, params, collect))
    engine.step()
    while engine.scheduler.has_work():
        engine.step()
    return [results[str(i)] for i in range(len(prompts))]
