"""optiserve.engine: the model, KV cache, scheduler, sampling and speculative decoding."""
