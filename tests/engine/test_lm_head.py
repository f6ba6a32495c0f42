"""The LM head in bf16 / int8 / fp8 (`--lm-head-dtype`): the bf16-weight path of the packed CPU kernel is exact
(both builds), the default model's logits stay close to fp32 ones, greedy decoding is compared, and the head
survives weight swaps without touching the embedding or the unquantized master."""

from __future__ import annotations

import pytest
import torch

from optiserve.engine import packed_linear as pl
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, run_to_completion
from optiserve.engine.lm_head import LowPrecisionLinear, with_lm_head
from optiserve.engine.quant import weight_bytes
from optiserve.engine.runner import ModelRunner
from optiserve.engine.weight_set import WeightSet
from tests.kernels.test_packed_cpu import assert_product_up_to_order, assert_rows_alone
from tests.kernels.utils import AVX2, needs_distinct_avx2_build

KERNEL = pl.load()
needs_kernel = pytest.mark.skipif(KERNEL is None, reason="the packed CPU kernel is not built here")
HEAD_DTYPES = ["bfloat16", "int8", "fp8"]
SQNR_FLOOR_DB = {"bfloat16": 45.0, "int8": 38.0, "fp8": 25.0}  # fp8: one per-tensor scale (27.8 dB measured)
GREEDY_TOKENS = 32


def sqnr_db(x: torch.Tensor, ref: torch.Tensor) -> float:
    return 10 * torch.log10(ref.double().pow(2).sum() / (x.double() - ref.double()).pow(2).sum()).item()


def check_bf16_kernel(kernel, n: int, k: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    ops = pl.bf16_operands(w)
    assert torch.equal(pl.packed_linear(torch.eye(k), ops, None, kernel).t(), w.float())  # decoded bit for bit
    b = torch.randn(n, generator=gen)
    for m in [1, 2, 3, 5, 8, 13, 16, 20]:
        x = torch.randn(m, k, generator=gen)
        assert_product_up_to_order(assert_rows_alone(kernel, x, ops, b), x, w.float(), b)


@needs_kernel
@pytest.mark.parametrize(("n", "k"), [(576, 576), (1536, 576), (30, 37), (64, 100)])
def test_bf16_weights_decode_exactly_and_multiply_up_to_order(n, k):
    check_bf16_kernel(KERNEL, n, k, n + k)


@needs_kernel
@needs_distinct_avx2_build
def test_bf16_weights_in_the_avx2_build_too():
    avx2 = pl.build(AVX2)
    for n, k in [(576, 576), (30, 37)]:
        check_bf16_kernel(avx2, n, k, 7)


def test_an_unknown_head_dtype_is_refused():
    with pytest.raises(ValueError, match="lm_head dtype"):
        EngineConfig(lm_head_dtype="int4")


@pytest.mark.parametrize("dtype", HEAD_DTYPES)
def test_logits_stay_close_and_only_the_head_changes(engine, chat_prompt_ids, dtype):
    model = engine.master
    head = with_lm_head(model, dtype)
    assert isinstance(head.lm_head, LowPrecisionLinear) and head.embed.weight is model.embed.weight
    assert not isinstance(model.lm_head, LowPrecisionLinear)  # the master keeps its fp32 head
    assert (head.lm_head.operands is not None) == (KERNEL is not None)  # computed from the low-precision weights
    bytes_per_weight = 2 if dtype == "bfloat16" else 1
    held = weight_bytes(head)[1] - weight_bytes(model)[1]
    assert held == pytest.approx(model.lm_head.weight_t.nbytes * (bytes_per_weight / 4 - 1), rel=0.01)
    prompt = chat_prompt_ids[0]
    ref = ModelRunner(model, 1, len(prompt), torch.float32).prefill(0, prompt, all_logits=True)  # [S, V]
    logits = ModelRunner(head, 1, len(prompt), torch.float32).prefill(0, prompt, all_logits=True)
    print(f"{dtype}: logits SQNR {sqnr_db(logits, ref):.1f} dB")
    assert sqnr_db(logits, ref) > SQNR_FLOOR_DB[dtype]
    states = torch.randn(4, model.cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    exact = states.double() @ head.lm_head.dequantized().double().t()
    torch.testing.assert_close(head.lm_head(states).double(), exact, rtol=0, atol=1e-4)


@pytest.mark.parametrize("dtype", HEAD_DTYPES)
def test_greedy_decoding_and_swaps_keep_the_head(engine, chat_prompt_ids, dtype):
    """The engine serves with the head, also after a swap back to the master's weights; greedy tokens on a short
    chat generation are compared with fp32's (bf16 and int8 equal; fp8 may part after a near tie)."""
    params = SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0.0, ignore_eos=True)
    prompts = chat_prompt_ids[:2]
    ref = run_to_completion(engine, prompts, params)
    low = LLMEngine(EngineConfig(model="default", max_batch=2, max_model_len=256, lm_head_dtype=dtype))
    assert isinstance(low.runner.model.lm_head, LowPrecisionLinear)
    out = run_to_completion(low, prompts, params)
    if dtype != "fp8":
        assert out == ref
    low.use_weights(WeightSet(low.master))
    assert isinstance(low.runner.model.lm_head, LowPrecisionLinear)
    assert run_to_completion(low, prompts, params) == out
