"""The engine: one thread owns the model and runs scheduler steps; callers submit requests and get outputs.

Failures stay with the request they happened on: an exception while taking a request in, prefilling it,
sampling for it, detokenizing or reporting it fails that request alone (its caller gets an output with
`error` set) and the batch goes on. A batched forward that raises is retried one sequence at a time, so
the sequence at fault fails alone there too (`engine/outputs.py` reports and fails requests).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import queue
import threading
from dataclasses import dataclass

import torch

from .config import EngineConfig, ModelConfig, SamplingParams
from .faults import EngineDeadError, fail_request, fault_seed_from_env
from .lm_head import with_lm_head
from .model import Transformer
from .outputs import Outputs
from .quant import weight_bytes
from .quantized_checkpoint import is_modelopt_checkpoint, load_quantized_checkpoint
from .ragged import RaggedBatch, add_prompt_logprobs, wants_prompt_logprobs
from .request_checks import RequestError, check_lengths
from .runner import ModelRunner
from .sampler import make_generator
from .scheduler import Chunk, Scheduler
from .sequence import Request, RequestOutput, Sequence
from .spec.decoder import Accepted, make_spec_decoder
from .swap import SwapError, SwapQueue, WeightSwitcher, release_freed_memory
from .weight_set import WeightSet
from .weights import default_served_name, load_model, resolve_model_dir

log = logging.getLogger(__name__)


__all__ = ["EngineDeadError", "LLMEngine", "RequestError", "SwapError", "WeightSet", "run_to_completion"]


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache (vLLM's names), and found
    prefix_cache_hits: int = 0
    num_preemptions: int = 0  # sequences whose blocks were taken back to be recomputed later (vLLM's counter)


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
        # Verification writes draft positions past a sequence's end before rolling back: room for them.
        cache_len = self.max_model_len + cfg.spec_cache_room
        quantized = None
        if is_modelopt_checkpoint(self.model_dir):  # served as packed; no unquantized master copy exists
            quantized = load_quantized_checkpoint(self.model_dir, cache_len, dtype, cfg.device)
            model = quantized.model
        else:
            model = load_model(self.model_dir, cache_len, dtype, cfg.device, mapped=True)
        self.master: Transformer | None = None if quantized else model  # unquantized weights, for format swaps
        served = with_lm_head(model, cfg.lm_head_dtype)
        self.runner = ModelRunner(served, cfg.max_batch, cache_len, dtype, cfg.kv_block_size, cfg.kv_cache_memory,
                                  cfg.enable_prefix_caching, cfg.kv_cache_format)
        self.spec = make_spec_decoder(cfg, self.runner, self.model_dir)
        self.scheduler = Scheduler(cfg.max_batch, self.runner.cache.tables, cfg.spec_cache_room,
                                   cfg.max_num_batched_tokens, cfg.max_prefill_tokens)
        self.eos_ids = set(self.model_config.eos_token_ids) | {self.tokenizer.eos_token_id} - {None}
        self.outputs = Outputs(self.scheduler, self.tokenizer, self.eos_ids, self.max_model_len, fault_seed_from_env(),
                               self.spec is not None)
        self._new: queue.SimpleQueue[Request] = queue.SimpleQueue()  # filled by callers, drained by the loop
        self._aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._swaps = SwapQueue()
        self.weights = WeightSet(served, "none")
        self.switcher = WeightSwitcher(self.runner, self.spec, self._run_prefill)
        if quantized is not None:
            self._apply_weights(quantized)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False

    # ---- public API -------------------------------------------------------------------------------
    def check_request(self, prompt_len: int, max_tokens: int | None) -> int:
        """Validate lengths (and that the KV pool can ever hold the sequence); return the effective max_tokens
        (default: the rest of the context)."""
        effective = check_lengths(prompt_len, max_tokens, self.max_model_len)
        self.scheduler.check_fits(prompt_len + effective, "prompt" if max_tokens is None else "max_tokens")
        return effective

    def alive(self) -> bool:
        """False once a started engine thread has stopped; an engine never started is driven by `step()`."""
        return self._thread is None or self._thread.is_alive()

    def add_request(self, request: Request) -> None:
        """Queue a request (thread-safe). Its `emit` callback is called from the engine thread."""
        if not self.alive():
            raise EngineDeadError("the engine has stopped")
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
        every token after the switch comes from the new weight set. Raises SwapError if the switch failed: the
        engine then still serves the old weights, and no request was failed by it.
        """
        if self._thread is None:
            self._apply_weights(weights)
            return
        if not self._thread.is_alive():
            raise EngineDeadError("the engine has stopped")
        self._swaps.submit(weights, self._wake.set, timeout_s)

    def _apply_weights(self, weights: WeightSet) -> None:
        # Every weight set serves with the configured LM head (formed here, so swaps and checkpoints keep it).
        weights = dataclasses.replace(weights, model=with_lm_head(weights.model, self.cfg.lm_head_dtype))
        fail = self.outputs.fail
        self.switcher.switch(self.weights, weights, self.scheduler.running, lambda seq, e: fail(seq.request, e))
        old, self.weights = self.weights, weights
        del old
        release_freed_memory()

    def drop_master(self) -> None:
        """Let the unquantized weights go (`serve --no-swap`): format swaps are refused from then on."""
        self.master = None
        release_freed_memory()

    def weight_bytes(self) -> int:
        """Bytes of the model's weights as held in memory (a tied LM head's transposed copy included)."""
        return weight_bytes(self.weights.model)[1]

    def stats(self) -> EngineStats:
        s = self.scheduler
        prefix = s.tables.pool.stats
        return EngineStats(len(s.running), len(s.waiting) + self._new.qsize(), s.kv_usage(), prefix.queries,
                           prefix.hits, s.num_preemptions)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="optiserve-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- the loop ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while not self._stopping:
                try:
                    self._drain_inbox()
                    if not self.scheduler.has_work():
                        self._wake.wait(timeout=0.5)
                        self._wake.clear()
                        continue
                    self.step()
                except Exception:  # not any one request's (those fail alone inside step): the engine's own state
                    log.exception("engine step failed outside any one request; failing the requests in flight")
                    self._fail_in_flight("the engine failed while running this request")
        finally:
            if not self._stopping:
                log.critical("the engine thread stopped; /health now answers 503")
            self._fail_in_flight("the engine stopped")  # nobody may wait on a thread that is gone
            self._swaps.fail_pending(EngineDeadError("the engine stopped"))

    def _drain_inbox(self) -> None:
        """Switch weights if asked, take in new requests, then apply aborts (an abort follows its add)."""
        self._swaps.run_pending(self._apply_weights)
        while not self._new.empty():
            request = self._new.get_nowait()
            self.outputs.guard(request, self._enqueue, request)
        while not self._aborts.empty():
            for seq in self.scheduler.sequences_of(self._aborts.get_nowait()):
                self.scheduler.release(seq)

    def _enqueue(self, request: Request) -> None:
        p = request.params
        max_tokens = self.check_request(len(request.prompt_ids), p.max_tokens)
        seqs = [Sequence(request, i, list(request.prompt_ids), max_tokens, make_generator(p.seed, i))
                for i in range(p.n)]
        for seq in seqs:  # all or none: a failure above leaves nothing queued
            self.scheduler.add(seq)

    # ---- failing every request ---------------------------------------------------------------------------
    def _fail_in_flight(self, message: str) -> None:
        """Fail every queued and running request (the engine cannot go on with them)."""
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            fail_request(self.scheduler, seq.request, message)
        while not self._new.empty():
            fail_request(self.scheduler, self._new.get_nowait(), message)
        for seq in list(self.scheduler.running):
            self.scheduler.release(seq)

    # ---- one step ------------------------------------------------------------------------------------
    def step(self) -> None:
        """One scheduler step: with a token budget, one forward over decode rows and prompt chunks; without,
        newly admitted sequences are prefilled whole, then every running one decodes (or speculates) a step."""
        self._drain_inbox()
        if self.scheduler.token_budget:
            self._step_chunks()
        else:
            self._step_whole()
        self._release_finished()

    def _step_whole(self) -> None:
        for seq in self.scheduler.admit():
            if seq.finish_reason is None:  # not failed with a sibling already
                self.outputs.guard(seq.request, self._prefill, seq)
                self.scheduler.commit([seq])  # its prompt's blocks are findable by the next one admitted
        self._release_finished()  # so the running sequences are exactly slots [0, B)
        running = self.scheduler.running
        if running:
            self.outputs.append(running, self._forward(running))
            self.scheduler.commit(running)

    def _step_chunks(self) -> None:
        plan = self.scheduler.schedule()
        if not plan.chunks:
            return  # nothing runs and nothing could be admitted (no work, or a sibling's prompt is still computed)
        self.runner.cache.copy_blocks(plan.block_copies)
        sampling, rows = [], []
        for chunk, logits in zip(plan.chunks, self._forward_chunks(plan.chunks), strict=True):
            seq = chunk.seq
            if logits is None or seq.finish_reason is not None:
                continue
            seq.num_computed = chunk.end
            if wants_prompt_logprobs(seq, chunk.start):
                self.outputs.guard(seq.request, add_prompt_logprobs, seq.request, logits, chunk.start)
            if not chunk.samples or seq.finish_reason is not None:
                continue
            if seq.max_tokens == 0:
                self.outputs.guard(seq.request, self.outputs.finish_echo, seq)
            else:
                sampling.append(seq)
                rows.append(logits[-1])
        if sampling:
            self.outputs.append(sampling, self.outputs.sample(sampling, torch.stack(rows)))

    def _forward_chunks(self, chunks: list[Chunk]) -> list[torch.Tensor | None]:
        """Each chunk's logits: every row when prompt logprobs are wanted, its last row when it samples, else none
        ([0, V]); None where its request failed. A ragged forward that raises is retried chunk by chunk."""
        try:
            return self._run_chunks(chunks)
        except Exception:
            log.exception("a forward of %d chunks failed; retrying them one at a time", len(chunks))
        self.runner.cache.tables.forget_prefixes()  # blocks keyed at scheduling may hold no KV now
        results = []
        for chunk in chunks:
            try:
                results += self._run_chunks([chunk])
            except Exception as e:
                self.outputs.fail(chunk.seq.request, e)
                results.append(None)
        return results

    def _run_chunks(self, chunks: list[Chunk]) -> list[torch.Tensor]:
        batch = RaggedBatch.of(chunks)
        logits = self.runner.forward_rows(batch.slots, batch.tokens, batch.positions, batch.logit_rows)  # [R, V]
        return batch.split(logits.cpu())

    def _forward(self, running: list[Sequence]) -> list[Accepted | None]:
        """Each running sequence's new tokens (None: its request failed). A batched forward that raises cannot
        say whose input caused it, so every sequence is retried alone: only the one at fault fails."""
        # A drafter's per-sequence state, as before the step: a speculative step that fails part-way is undone.
        draft_states = [copy.copy(s.draft_state) for s in running]
        try:
            if self.spec:
                return self.spec.step(running)
            logits = self.runner.decode([s.token_ids[-1] for s in running], [len(s.token_ids) - 1 for s in running])
            # On a GPU too: seeded requests draw from per-sequence CPU generators, so samples repeat across devices
            return self.outputs.sample(running, logits.cpu())
        except Exception:
            log.exception("a batched forward of %d sequences failed; retrying them one at a time", len(running))
            for seq, state in zip(running, draft_states, strict=True):
                seq.draft_state = state
            return [self._forward_one(seq) for seq in running]

    def _forward_one(self, seq: Sequence) -> Accepted | None:
        """A plain (non-speculative) decode of one sequence in its own slot; a drafter gets its features."""
        if seq.finish_reason is not None:
            return None
        try:
            capture = self.spec.drafter.capture if self.spec else ()
            logits, features = self.runner.decode_at(seq.slot, seq.token_ids[-1], len(seq.token_ids) - 1, capture)
            if self.spec:
                self.spec.drafter.on_verify(seq, None if features is None else features[0])
        except Exception as e:
            self.outputs.fail(seq.request, e)
            return None
        return self.outputs.sample([seq], logits.cpu())[0]

    def _release_finished(self) -> None:
        for seq in [s for s in self.scheduler.running if s.finish_reason is not None]:
            self.scheduler.release(seq)

    def _run_prefill(self, seq: Sequence, token_ids: list[int], all_logits: bool = False,
                     start: int = 0) -> torch.Tensor:
        if self.spec:
            return self.spec.prefill(seq, token_ids, all_logits, start)
        return self.runner.prefill(seq.slot, token_ids, all_logits, start).cpu()  # sampling runs on the CPU (see step)

    def _prefill(self, seq: Sequence) -> None:
        want_prompt_lp = wants_prompt_logprobs(seq, seq.num_computed)
        logits = self._run_prefill(seq, seq.token_ids, want_prompt_lp, seq.num_computed)
        seq.num_computed = len(seq.token_ids)
        if want_prompt_lp:
            add_prompt_logprobs(seq.request, logits, 0)
            logits = logits[-1]
        if seq.max_tokens == 0:
            self.outputs.finish_echo(seq)
        else:
            self.outputs.append([seq], self.outputs.sample([seq], logits.unsqueeze(0)))


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
