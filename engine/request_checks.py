"""Checks a request must pass before the engine queues it."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine cannot run (e.g. longer than the context); the server answers 400 naming `param`."""

    def __init__(self, message: str, param: str = "prompt"):
        super().__init__(message)
        self.param = param


def check_lengths(prompt_len: int, max_tokens: int | None, max_model_len: int) -> int:
    """Validate lengths; return the effective max_tokens (default: the rest of the context)."""
    if prompt_len == 0:
        raise RequestError("the prompt is empty")
    room = max_model_len - prompt_len
    if room < 0 or (max_tokens is None and room == 0):
        raise RequestError(f"the prompt has {prompt_len} tokens, more than the model's context of {max_model_len}")
    if max_tokens is not None and max_tokens > room:
        raise RequestError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context of "
                           f"{max_model_len} tokens", "max_tokens")
    return room if max_tokens is None else max_tokens


def check_fits(num_blocks_needed: int, num_blocks: int, num_tokens: int, param: str) -> None:
    """A sequence must fit the KV-cache pool on its own, or it could never be scheduled."""
    if num_blocks_needed > num_blocks:
        raise RequestError(f"prompt + max_tokens ({num_tokens} tokens) need {num_blocks_needed} KV-cache blocks, "
                           f"more than the {num_blocks} the cache holds (--kv-cache-memory)", param)
