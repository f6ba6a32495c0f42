"""`echo` + `logprobs` on /v1/completions give the prompt's logprobs (lm-eval loglikelihood style)."""

import httpx
import torch

TOL = 1e-3
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."


def test_echo_prompt_logprobs_match_hf(server, engine, hf_model):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": TEXT, "max_tokens": 0, "echo": True, "logprobs": 1}
    r = httpx.post(f"{server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == TEXT
    lp = choice["logprobs"]
    ids = engine.tokenizer(TEXT).input_ids
    assert len(lp["token_logprobs"]) == len(ids) and lp["token_logprobs"][0] is None
    with torch.inference_mode():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].float(), -1)  # [S, V]
    expected = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    got = torch.tensor(lp["token_logprobs"][1:])
    assert (got - expected).abs().max().item() < TOL
    assert "".join(lp["tokens"]) == TEXT


def test_completion_logprobs_with_echo_and_generation(server):
    body = {"model": "SmolLM2-135M-Instruct", "prompt": "Hello", "max_tokens": 3, "echo": True, "logprobs": 2,
            "temperature": 0}
    choice = httpx.post(f"{server}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"])
    # greedy: each generated token is the top-1 of its step
    for tok, top in zip(lp["tokens"][-3:], lp["top_logprobs"][-3:], strict=True):
        assert max(top, key=top.get) == tok
