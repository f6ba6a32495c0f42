"""The CPU kernel that multiplies from packed weights (`engine.packed_linear`), at three levels: its decoded weights
are bit for bit the `kernels/` references' dequantized values; each result is the fp32 product of those values and
the input up to summation order, with rows independent of each other (a verify row is a decode row); a
`QuantLinear` computes through it by default, holds no fp32 copy and agrees with the copy it replaces."""

from __future__ import annotations

import itertools
from copy import deepcopy

import pytest
import torch

from optiserve.engine import packed_linear as pl
from optiserve.engine.model import Transformer
from optiserve.engine.quant import QuantLinear, quantize_fused, quantize_weight, weight_bytes
from optiserve.engine.runner import ModelRunner
from optiserve.engine.weight_formats import weight_format
from tests.engine.test_speculative import assert_verify_equals_decode_steps
from tests.kernels.test_packed_compute import quantized_default_model
from tests.kernels.utils import AVX2, AVX2_BUILD_DISTINCT, NO_AMX, cpu_flags, needs_distinct_avx2_build

KERNEL = pl.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the packed CPU kernel is not built here")
FORMATS = ["nvfp4-w4a16", "int4", "int8", "fp8", "nvfp4", "int4-w4a8"]
SHAPES = [(576, 576), (192, 576), (1536, 576), (576, 1536), (30, 37), (64, 100), (20, 80)]  # (N, K): the model's, odd,
# and K = 80 (NVFP4: two-block spans, then one block alone)
ACTIVATION_DIVISOR = {"fp8": 448.0, "int8": 127.0, "nvfp4": 6 * 448.0}  # amax -> the calibrated input_scale


def packed(fmt: str, shapes: list[tuple[int, int]], seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return quantize_fused(fmt, [torch.randn(n, k, generator=gen) for n, k in shapes])


def dequantized(shards: list) -> torch.Tensor:
    return torch.cat([s.dequantize(torch.float32) for s in shards])  # [N, K]


def assert_product_up_to_order(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> None:
    """y equals x @ w.T + b computed exactly, within what fp32 summation in another order can move it."""
    exact = x.double() @ w.double().t() + (0 if b is None else b.double())
    bound = (x.double().abs() @ w.double().abs().t()) * (x.shape[-1] + 2) * 2.0**-24 + 1e-30
    assert ((y.double() - exact).abs() <= bound).all()


def assert_rows_alone(kernel, x: torch.Tensor, ops: pl.PackedOperands, b: torch.Tensor | None,
                      input_scale: torch.Tensor | None = None) -> torch.Tensor:
    y = pl.packed_linear(x, ops, b, kernel, input_scale)
    alone = torch.cat([pl.packed_linear(x[i : i + 1], ops, b, kernel, input_scale) for i in range(x.shape[0])])
    assert torch.equal(y, alone), f"{x.shape[0]} rows: a row differs from its 1-row call"
    return y


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_decoded_weights_are_the_reference_bits(fmt, n, k):
    """x = the identity: each output is one weight times 1.0, so y.T is the decoded weight itself."""
    shards = packed(fmt, [(n, k)])
    y = pl.packed_linear(torch.eye(k), pl.operands(weight_format(fmt), shards), None)  # [K, N]
    assert torch.equal(y.t(), dequantized(shards))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
def test_product_and_rows_alone_for_1_to_16_rows(fmt, n, k):
    shards = packed(fmt, [(n, k)], seed=n + k)
    ops, w = pl.operands(weight_format(fmt), shards), dequantized(shards)
    gen = torch.Generator().manual_seed(k)
    b = torch.randn(n, generator=gen)
    for m in [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 20]:  # 5-7: one pass (a verify), 13: 8 then 5
        x = torch.randn(m, k, generator=gen)
        assert_product_up_to_order(assert_rows_alone(KERNEL, x, ops, b), x, w, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_shards_write_side_by_side(fmt):
    shards = packed(fmt, [(576, 576), (192, 576), (192, 576)])  # q/k/v, one per-tensor scale for all
    gen = torch.Generator().manual_seed(1)
    x, b = torch.randn(2, 3, 576, generator=gen), torch.randn(960, generator=gen)
    y = pl.packed_linear(x, pl.operands(weight_format(fmt), shards), b)  # [2, 3, 960]
    assert y.shape == (2, 3, 960)
    assert_product_up_to_order(y.reshape(6, -1), x.reshape(6, -1), dequantized(shards), b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quant_linear_computes_packed_without_a_copy(fmt):
    gen = torch.Generator().manual_seed(2)
    shards = [quantize_weight(fmt, torch.randn(n, 576, generator=gen)) for n in (1536, 1536)]  # gate/up
    x = torch.randn(5, 576, generator=gen)
    args = (fmt, shards, None, torch.tensor(x.abs().max().item() / ACTIVATION_DIVISOR.get(fmt, 1.0)),
            torch.rand(576, generator=gen) + 0.5 if fmt.startswith("int4") else None, torch.float32)
    layer, copy = QuantLinear(*args), QuantLinear(*args, compute="copy")
    assert layer.compute == "packed" and layer.cpu_operands is not None and not hasattr(layer, "weight_t")
    assert layer.packed_bytes() < copy.resident_bytes() / 3  # 1 byte or less a weight
    gemm_bytes = sum(t.nbytes for t in layer.cpu_operands.gemm)  # INT8's copy for oneDNN's GEMM, where it runs
    assert gemm_bytes == 0 or (fmt == "int8" and gemm_bytes > 3072 * 576)
    assert layer.resident_bytes() == layer.packed_bytes() + gemm_bytes
    y, y_copy = layer(x), copy(x)
    torch.testing.assert_close(y, y_copy, rtol=1e-5, atol=1e-5 * y_copy.abs().max().item())
    model = torch.nn.Sequential(layer)
    assert weight_bytes(model) == (layer.packed_bytes(), layer.resident_bytes())
    x40 = torch.randn(40, 576, generator=gen)  # oneDNN's rows, where INT8 has its GEMM copy
    twin = deepcopy(layer)  # the GEMM copy is packed again from the copied codes
    assert len(twin.cpu_operands.gemm) == len(layer.cpu_operands.gemm) and torch.equal(twin(x40), layer(x40))


@needs_distinct_avx2_build
def test_the_avx2_build_is_correct_too():
    """Machines differ (AVX2-only or AVX-512): build for AVX2 here, check bit-exact decode and rows alone."""
    avx2 = pl.build(AVX2)
    gen = torch.Generator().manual_seed(3)
    for fmt in FORMATS:
        for n, k in [(576, 576), (30, 37)]:
            shards = packed(fmt, [(n, k)])
            ops = pl.operands(weight_format(fmt), shards)
            assert torch.equal(pl.packed_linear(torch.eye(k), ops, None, avx2).t(), dequantized(shards))
            x, b = torch.randn(16, k, generator=gen), torch.randn(n, generator=gen)
            assert_product_up_to_order(assert_rows_alone(avx2, x, ops, b), x, dequantized(shards), b)


@pytest.mark.parametrize("fmt", ["int4", "nvfp4", "int4-w4a8"])
def test_quantized_verify_rows_equal_decode_steps_bit_for_bit(engine, chat_prompt_ids, fmt):
    """On the quantized default model computed from packed weights (W4A4 included: its activation codes would flip
    on any last-bit difference), one forward over [last, 5 drafts] gives each row's logits as 6 decode steps do."""
    q = quantized_default_model(engine, fmt)
    assert all(m.cpu_operands is not None for m in q.modules() if isinstance(m, QuantLinear))
    prompt = chat_prompt_ids[1]
    assert_verify_equals_decode_steps(ModelRunner(q, 1, len(prompt) + 8, torch.float32), prompt)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if weight_format(f).activations is not None])
def test_activations_are_quantized_to_the_reference_bits(fmt):
    """The kernel's one-pass activation quantizer (W4A4 NVFP4, W8A8 INT8, FP8) against the format's reference
    quantize-dequantize: random rows of odd and model widths, an all-zero block, values beyond the calibrated range
    (saturating) and values on every rounding boundary (ties)."""
    f = weight_format(fmt)
    gen = torch.Generator().manual_seed(5)
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, 0.5, 1.5, 127.5, 126.5, 448.0, 464.0, 0.0, -2.5])
    for shape in [(1, 576), (5, 1536), (3, 37), (2, 80)]:
        x = torch.randn(*shape, generator=gen) * 4
        x[0, :16] = 0.0
        x[-1, :16] = torch.cat([ties[:8], -ties[8:]])
        scale = f.activations.input_scale(x.abs().amax() / 2)
        want = f.activations.fake_quant(x, scale)
        assert torch.equal(pl.fake_quant_activations(f, x, scale), want), (fmt, shape)
    scale = torch.tensor(1.0)  # the ties land on the boundaries themselves
    assert torch.equal(pl.fake_quant_activations(f, ties[None], scale), f.activations.fake_quant(ties[None], scale))
    if not f.activations.kind.startswith("int8"):  # NaN in, NaN out as the reference (int8: torch's cast of NaN
        # is undefined)
        x = torch.randn(2, 48, generator=gen)
        x[0, 3] = float("nan")
        got, want = pl.fake_quant_activations(f, x, scale), f.activations.fake_quant(x, scale)
        assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(), want.nan_to_num())


def int8_builds() -> list:
    """This machine's kernel, its AVX2 build where the CPU has AVX-512 too, and its build without AMX where it has
    AMX-INT8 (machines differ: each instruction set must give the same sums)."""
    flags = cpu_flags()
    return [KERNEL, *([pl.build(AVX2)] if AVX2_BUILD_DISTINCT else []),
            *([pl.build(NO_AMX)] if "amx_int8" in flags else [])]


def test_int8_w8a8_is_the_integer_product_with_vnni_or_avx2():
    """With AVX512-VNNI (`vpdpbusd`; blocks of weight rows that 1-4 input rows at a time pass over; oneDNN's int8
    GEMM on the codes packed once, from 32 rows without AMX, from 16 with it), AMX-INT8 tiles (12-15 rows, or any
    count for a layer without its GEMM copy) or AVX2
    (`vpmaddwd`), INT8 W8A8 sums integer code products exactly,
    then scales: the bits of the GPU path (`int8_matmul`: `torch._int_mm`, scales, bias), for any number of rows,
    odd K and codes of -128; a pre-quant scale multiplied in while quantizing gives the bits of multiplying first.
    Without VNNI or AVX2, the kernel multiplies the quantized values in fp32: the product up to summation order."""
    from optiserve.engine.weight_formats.int8 import int8_matmul

    f, gen = weight_format("int8"), torch.Generator().manual_seed(9)
    for kernel in int8_builds():
        for n, k in [(576, 576), (576, 1536), (30, 37), (20, 80)]:
            shards = [quantize_weight("int8", torch.randn(r, k, generator=gen)) for r in (n, n // 2 + 1)]
            b = torch.randn(n + n // 2 + 1, generator=gen)
            with_gemm = pl.operands(f, shards, quantized_input=True)
            assert bool(with_gemm.gemm) == ("avx512_vnni" in cpu_flags() or "avx_vnni" in cpu_flags())
            for ops, m in itertools.product((pl.operands(f, shards), with_gemm), (1, 3, 4, 5, 8, 11, 12, 16, 40, 130)):
                # 12+: AMX tiles; with the GEMM copy 16+: oneDNN (32+ without AMX)
                x = torch.randn(m, k, generator=gen) * 2
                scale = f.activations.input_scale(x.abs().amax() * 0.7)  # some inputs saturate (to -128 too)
                got = assert_rows_alone(kernel, x, ops, b, scale)
                pre = torch.rand(k, generator=gen) + 0.5  # SmoothQuant's: multiplied in while quantizing
                assert torch.equal(pl.packed_linear(x, ops, b, kernel, scale, pre),
                                   pl.packed_linear(x * pre, ops, b, kernel, scale))
                if kernel.int8_integer_path():
                    assert torch.equal(got, torch.cat([int8_matmul(x, w, scale, None) for w in shards], -1) + b)
                else:
                    assert_product_up_to_order(got, f.activations.fake_quant(x, scale), dequantized(shards), b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_fused_layer_steps_give_the_modules_results_bit_for_bit(engine, chat_prompt_ids, fmt, stack_calls):
    """Every format runs a forward whose rows attend through the kernel (prefill, verify, decode, a draft tree) as one
    kernel call over all layers (`decoder_layers`); with that call refused, layer by layer as three kernel calls
    around the attention (`DecoderLayer.fused_forward`; activation-quantizing formats quantize each linear's input
    inside them); with the fused weights taken away, module by module. Prefill, verify, decode and draft-tree logits
    must be equal bit for bit (same kernels, same fp32 operations)."""
    q = quantized_default_model(engine, fmt)
    linears = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert all(m.fused is not None for m in linears)
    prompt = chat_prompt_ids[0]
    watch, refuse = stack_calls

    def logits() -> tuple[torch.Tensor, ...]:
        runner = ModelRunner(q, 1, len(prompt) + 2, torch.float32)
        start = len(prompt) - 5
        prefill = runner.prefill(0, prompt[:start], all_logits=True)
        verify = runner.verify([prompt[start:]], [start])[0]  # 5 rows through the attention kernel
        decode = runner.decode([prompt[-1]], [len(prompt)])
        parents = [-1, 0, 0, 1, 2]  # a draft tree over the same slots: two branches of two
        tree = runner.verify_tree([prompt[start:]], [start], [parents])[0]
        return prefill, verify, decode, tree

    stacked = watch(Transformer, "layer_stack")
    whole = logits()
    assert stacked == [True] * 4
    refuse(Transformer, "layer_stack")
    layered = logits()
    saved = [m.fused for m in linears]
    try:
        for m in linears:
            m.fused = None
        modules = logits()
    finally:
        for m, f in zip(linears, saved, strict=True):
            m.fused = f
    for a, b, c in zip(whole, layered, modules, strict=True):
        assert torch.equal(a, b) and torch.equal(b, c)
