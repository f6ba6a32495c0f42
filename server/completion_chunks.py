"""Turns engine outputs into /v1/completions choices (text, legacy logprobs, echo), for streams and wholes."""

from __future__ import annotations

from functools import lru_cache

from optiserve.engine.sequence import RequestOutput, TokenLogprob

from .protocol import CompletionRequest


class LegacyLogprobs:
    """Builds the /v1/completions `logprobs` object (tokens, token_logprobs, top_logprobs, text_offset)."""

    def __init__(self, tokenizer):
        self.token_text = lru_cache(maxsize=65536)(lambda t: tokenizer.decode([t]))
        self.offset = 0

    def build(self, items: list[TokenLogprob | None], token_ids: list[int]) -> dict:
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for tok, item in zip(token_ids, items, strict=True):
            text = self.token_text(tok)
            out["tokens"].append(text)
            out["token_logprobs"].append(None if item is None else item.logprob)
            out["top_logprobs"].append(None if item is None else {self.token_text(t): lp for t, lp in item.top.items()})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge_logprobs(a: dict | None, b: dict | None) -> dict | None:
    if a is None or b is None:
        return a or b
    return {k: a[k] + b[k] for k in a}


def merge_choice(whole: dict | None, chunk: dict) -> dict:
    """Append a streamed choice chunk to the whole choice built so far."""
    if whole is None:
        return dict(chunk)
    return {"index": chunk["index"], "text": whole["text"] + chunk["text"],
            "logprobs": merge_logprobs(whole["logprobs"], chunk["logprobs"]),
            "finish_reason": chunk["finish_reason"] or whole["finish_reason"]}


class CompletionChunks:
    """Per-choice state across a request's outputs: logprob offsets, whether the prompt was echoed yet."""

    def __init__(self, req: CompletionRequest, prompts: list[list[int]], tokenizer):
        self.req, self.prompts, self.tok = req, prompts, tokenizer
        self.builders = {(p, s): LegacyLogprobs(tokenizer) for p in range(len(prompts)) for s in range(req.n)}
        self.echoed: set[tuple[int, int]] = set()
        self.generated = 0

    def choices(self, p_idx: int, out: RequestOutput) -> list[dict]:
        """One choice chunk per sequence output in `out`; the first chunk of each choice carries the echo."""
        req, ids = self.req, self.prompts[p_idx]
        chunks = []
        for o in out.outputs:
            self.generated += len(o.token_ids)
            key, text, lp = (p_idx, o.index), o.text, None
            first_echo = req.echo and key not in self.echoed
            if first_echo:
                self.echoed.add(key)
                text = self.tok.decode(ids, skip_special_tokens=False) + text
            if req.logprobs is not None:
                builder = self.builders[key]
                if first_echo:
                    lp = builder.build(out.prompt_logprobs or [None] * len(ids), ids)
                lp = merge_logprobs(lp, builder.build(o.logprobs, [x.token_id for x in o.logprobs]))
            chunks.append({"index": p_idx * req.n + o.index, "text": text, "logprobs": lp,
                           "finish_reason": o.finish_reason})
        return chunks
