"""INT4 W4A8 (`int4-w4a8`): INT4 AWQ weights times activations quantized to int8 per row and 128-group at run time,
summed as integers on the CPU. Three levels, as for the other formats: the activation codes' bit patterns (ties to
even, all-zero groups, odd K), the kernel equal to the reference `int4_w4a8_matmul` bit for bit (every ISA build
here: integer sums do not depend on the instruction set), and an SQNR floor beside W4A16 on the same weights."""

from __future__ import annotations

import pytest
import torch

from optiserve.engine import packed_linear as pl
from optiserve.engine.weight_formats import weight_format
from optiserve.engine.weight_formats.int4 import int4_w4a8_matmul
from optiserve.kernels.int8 import Int8GroupTensor
from tests.kernels.test_packed_cpu import assert_rows_alone, packed
from tests.kernels.utils import AVX2, NO_AMX, cpu_flags, needs_distinct_avx2_build

KERNEL = pl.load()
pytestmark = pytest.mark.skipif(KERNEL is None, reason="the packed CPU kernel is not built here")
W4A8 = weight_format("int4-w4a8")
ONE = torch.tensor(1.0)  # the format's input_scale: nothing static


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(signal.pow(2).sum() / (signal - approx).pow(2).sum())).item()


def test_activation_codes_round_half_to_even_per_group():
    """Group 0's amax is 127, so its scale is 1.0 and its values are their own codes: ties go to the even code.
    Group 1 is all zeros (scale 1.0, codes 0); group 2 holds the 4 columns past 256 (K = 260), amax 63.5 (scale
    0.5: -31.75 and 16.25 are ties too)."""
    x = torch.zeros(1, 260)
    x[0, :8] = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -126.5, 3.49])
    x[0, 256:] = torch.tensor([63.5, -31.75, 0.0, 16.25])
    q = Int8GroupTensor.from_float(x, 128)
    assert q.qdata.shape == (1, 3, 128) and q.scale.shape == (1, 3)
    assert q.qdata[0, 0, :8].tolist() == [127, 0, 2, 2, 0, -2, -126, 3]
    assert q.scale[0, :2].tolist() == [1.0, 1.0] and not q.qdata[0, 1].any()
    assert q.scale[0, 2].item() == 0.5 and q.qdata[0, 2, :4].tolist() == [127, -64, 0, 32]
    assert not q.qdata[0, 2, 4:].any()  # the padding of the last group
    assert q.dequantize(torch.float32).shape == (1, 260)
    for shape in [(1, 576), (5, 1536), (3, 37), (2, 260)]:
        y = torch.randn(*shape) * 3
        y[0, :8] = x[0, :8]  # the ties
        assert torch.equal(pl.fake_quant_activations(W4A8, y, ONE), W4A8.activations.fake_quant(y, ONE)), shape


@pytest.mark.parametrize(("n", "k"), [(576, 576), (192, 576), (576, 1536), (30, 37), (64, 100), (20, 260)])
def test_kernel_is_the_reference_bit_for_bit_for_1_to_20_rows(n, k):
    shards = packed("int4-w4a8", [(n, k), (n, k)], seed=n + k)  # a fused pair, side by side
    ops = pl.operands(W4A8, shards)
    gen = torch.Generator().manual_seed(k)
    b = torch.randn(2 * n, generator=gen)
    for m in [1, 2, 3, 4, 5, 7, 8, 13, 16, 20, 40]:  # 8+: AMX tiles where the CPU has AMX-INT8
        x = torch.randn(m, k, generator=gen) * 2
        got = assert_rows_alone(KERNEL, x, ops, b, ONE)
        assert torch.equal(got, torch.cat([int4_w4a8_matmul(x, w, ONE, None) for w in shards], -1) + b), (n, k, m)


@needs_distinct_avx2_build
def test_avx2_and_baseline_builds_give_the_same_bits():
    """The AVX2 (`vpmaddubsw`), plain x86-64 (scalar) and, where the CPU has AMX, no-AMX builds sum the same
    integers: the same bits as here (16 rows: AMX tiles here where there are some)."""
    builds = [pl.build(AVX2), pl.build(["-O3", "-march=x86-64", "-fopenmp"]),
              *([pl.build(NO_AMX)] if "amx_int8" in cpu_flags() else [])]
    gen = torch.Generator().manual_seed(4)
    for n, k in [(576, 576), (30, 37), (20, 260)]:
        ops = pl.operands(W4A8, packed("int4-w4a8", [(n, k)]))
        x, b = torch.randn(16, k, generator=gen), torch.randn(n, generator=gen)
        want = pl.packed_linear(x, ops, b, KERNEL, ONE)
        for build in builds:
            assert torch.equal(assert_rows_alone(build, x, ops, b, ONE), want), (n, k)


def test_sqnr_stays_near_w4a16_on_the_same_weights():
    """Int8 activations per 128-group cost little beside the 4-bit weights: the product's SQNR against fp32 is
    within 0.5 dB of W4A16's (INT4 with fp32 activations) on Gaussian data with a few outlier channels."""
    gen = torch.Generator().manual_seed(6)
    w, x = torch.randn(576, 1536, generator=gen), torch.randn(8, 1536, generator=gen)
    x[:, ::97] *= 20  # outlier channels, as LLM activations have
    exact = x @ w.T
    packed_w = W4A8.quantize(w, None)
    w4a16 = x @ packed_w.dequantize(torch.float32).T
    w4a8 = pl.packed_linear(x, pl.operands(W4A8, [packed_w]), None, KERNEL, ONE)
    assert sqnr_db(exact, w4a16) > 18
    assert sqnr_db(exact, w4a8) > sqnr_db(exact, w4a16) - 0.5
