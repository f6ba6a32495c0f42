"""Level 1: hand-written bit patterns of every format, on both the torch reference and the Triton kernel."""

from __future__ import annotations

import pytest
import torch

from optiserve.kernels import FP8Tensor, Int4Tensor, Int8Tensor, NVFP4Tensor, quantize_nvfp4_activation
from optiserve.kernels.nvfp4 import e2m1_encode_reference
from optiserve.kernels.nvfp4_kv import quantize_nvfp4_kv
from tests.kernels.utils import bits

PATHS = pytest.mark.parametrize("use_kernel", [False, True], ids=["torch", "triton"])

# |scaled value| -> E2M1 code; every tie goes to the even code (ModelOpt `_cast_fp4`)
E2M1_CASES = [
    (0.0, 0), (0.1, 0), (0.25, 0), (0.26, 1), (0.5, 1), (0.74, 1), (0.75, 2), (1.0, 2), (1.25, 2), (1.26, 3),
    (1.5, 3), (1.74, 3), (1.75, 4), (2.0, 4), (2.5, 4), (2.51, 5), (3.0, 5), (3.49, 5), (3.5, 6), (4.0, 6),
    (5.0, 6), (5.01, 7), (6.0, 7), (7.0, 7), (1e9, 7),
]


def test_e2m1_rounding_table() -> None:
    v = torch.tensor([c[0] for c in E2M1_CASES])
    want = torch.tensor([c[1] for c in E2M1_CASES], dtype=torch.uint8)
    assert e2m1_encode_reference(v).tolist() == want.tolist()
    neg = e2m1_encode_reference(-v)
    assert neg[0] == 0x0  # -0.0 has no sign bit set (scaled < 0 is False)
    assert neg[1:].tolist() == (want[1:] | 0x8).tolist()  # -0.1, -0.25 -> 0x8: negative zero code
    assert e2m1_encode_reference(torch.tensor([float("nan")])).item() == 0x7  # like torch.searchsorted


def _blocks_with_scale_one(values: list[float]) -> torch.Tensor:
    """Rows of 16: 6.0 followed by 15 values, so with s2 = 1 the block scale is exactly 1.0."""
    values = values + [0.0] * (-len(values) % 15)
    rows = [[6.0, *values[i:i + 15]] for i in range(0, len(values), 15)]
    return torch.tensor(rows)


def _codes(q: torch.Tensor) -> torch.Tensor:
    return torch.stack([q & 0xF, q >> 4], dim=-1).reshape(*q.shape[:-1], -1)


@PATHS
def test_nvfp4_rounding_sign_and_scale_one(use_kernel: bool) -> None:
    vals = [c[0] for c in E2M1_CASES[:-2]]
    pos = _blocks_with_scale_one(vals)
    x = torch.cat([pos, -pos])
    t = NVFP4Tensor.from_float(x, per_tensor_scale=1.0, use_kernel=use_kernel)
    assert bits(t.scale).unique().tolist() == [0x38]  # every block scale is 1.0 in E4M3
    want_pos = e2m1_encode_reference(pos)
    codes = _codes(t.qdata)
    assert codes[: len(pos)].tolist() == want_pos.tolist()
    # negatives set the sign bit, also when they round to zero (0x8); -0.0 itself stays 0x0
    assert codes[len(pos):].tolist() == torch.where(pos == 0, 0, want_pos | 0x8).tolist()


@PATHS
def test_nvfp4_one_ulp_around_each_rounding_bound(use_kernel: bool) -> None:
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    below, above = torch.nextafter(bounds, torch.zeros(7)), torch.nextafter(bounds, torch.full((7,), 9.0))
    x = _blocks_with_scale_one(below.tolist() + above.tolist())
    codes = _codes(NVFP4Tensor.from_float(x, per_tensor_scale=1.0, use_kernel=use_kernel).qdata)
    got = codes.reshape(-1)[[i for i in range(codes.numel()) if i % 16]][:14]  # drop the 6.0 heading each block
    assert got.tolist() == [0, 1, 2, 3, 4, 5, 6] + [1, 2, 3, 4, 5, 6, 7]


@PATHS
def test_nvfp4_packing_low_nibble_is_even_index(use_kernel: bool) -> None:
    x = torch.zeros(1, 16)
    x[0, :4] = torch.tensor([0.5, 6.0, -6.0, 1.0])
    t = NVFP4Tensor.from_float(x, per_tensor_scale=1.0, use_kernel=use_kernel)
    assert t.qdata.shape == (1, 8) and t.qdata.dtype == torch.uint8
    assert t.qdata[0, :3].tolist() == [0x71, 0x2F, 0x00]


@PATHS
def test_nvfp4_block_scale_clamps_and_zero_block(use_kernel: bool) -> None:
    x = torch.zeros(3, 16)
    x[0, 0] = 0.001  # 0.001 / 6 < 2**-9 -> clamped to 2**-9 (0x01); 0.001 / 2**-9 = 0.512 -> code 1
    x[1, 0], x[1, 1] = 6000.0, -3000.0  # 6000 / 6 > 448 -> clamped to 448 (0x7E); values saturate to +-6
    t = NVFP4Tensor.from_float(x, per_tensor_scale=1.0, use_kernel=use_kernel)
    assert bits(t.scale)[:, 0].tolist() == [0x01, 0x7E, 0x38]  # row 2 is all zero -> scale 1.0
    assert _codes(t.qdata)[:, :2].tolist() == [[1, 0], [0x7, 0xF], [0, 0]]
    deq = t.dequantize()
    assert deq[1, :2].tolist() == [6 * 448.0, -6 * 448.0]
    assert deq[0, 0].item() == 0.5 * 2**-9


@PATHS
def test_nvfp4_scale_formulas_and_negative_zero_decode(use_kernel: bool) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 64, generator=g) * 3
    x[0, 1], x[0, 2] = -0.0, -1e-6  # -0.0 -> 0x0, tiny negative -> 0x8; both decode to +0.0
    t = NVFP4Tensor.from_float(x, use_kernel=use_kernel)
    s2 = x.abs().amax() / (6.0 * 448.0)
    assert bits(t.per_tensor_scale).item() == bits(s2).item()
    block_amax = x.reshape(4, 4, 16).abs().amax(-1)
    want = (block_amax / (6.0 * s2)).clamp(2**-9, 448.0).to(torch.float8_e4m3fn)
    assert bits(t.scale).tolist() == bits(want).tolist()
    assert _codes(t.qdata)[0, 1:3].tolist() == [0x0, 0x8]
    deq = t.dequantize()
    assert not torch.signbit(deq[0, 1:3]).any()


@PATHS
def test_nvfp4_all_zero_tensor_and_padding(use_kernel: bool) -> None:
    z = NVFP4Tensor.from_float(torch.zeros(2, 32), use_kernel=use_kernel)
    assert z.per_tensor_scale.item() == 1.0 and bits(z.scale).unique().tolist() == [0x38]
    assert torch.equal(z.dequantize(), torch.zeros(2, 32))
    x = torch.arange(1, 41, dtype=torch.float32).reshape(2, 20)  # K = 20 -> padded to 32
    t = NVFP4Tensor.from_float(x, use_kernel=use_kernel)
    assert t.qdata.shape == (2, 16) and t.scale.shape == (2, 2)
    assert (_codes(t.qdata)[:, 20:] == 0).all()
    assert t.dequantize().shape == (2, 20)


@PATHS
def test_nvfp4_activation_path_uses_given_global_scale(use_kernel: bool) -> None:
    x = torch.tensor([[1.0] * 16, [12.0] + [0.0] * 15])
    s2 = 1.0 / 448.0  # calibrated for amax = 6; the second block exceeds it
    t = quantize_nvfp4_activation(x, s2, use_kernel=use_kernel)
    assert bits(t.per_tensor_scale).item() == bits(torch.tensor(s2)).item()
    want = (x.abs().amax(-1) / (6.0 * torch.tensor(s2))).clamp(2**-9, 448.0).to(torch.float8_e4m3fn)
    assert bits(t.scale[:, 0]).tolist() == bits(want).tolist()
    assert bits(t.scale)[1, 0] == 0x7E and _codes(t.qdata)[1, 0] == 0x7  # 12 saturates to 6 * 448 * s2


@PATHS
def test_fp8_e4m3_rounding_and_saturation(use_kernel: bool) -> None:
    m = 2.0**-9
    cases = [(1.0, 0x38), (448.0, 0x7E), (500.0, 0x7E), (-1000.0, 0xFE), (m, 0x01), (1.5 * m, 0x02),
             (2.5 * m, 0x02), (0.5 * m, 0x00), (0.75 * m, 0x01), (1.0625, 0x38), (1.1875, 0x3A), (-0.0, 0x80),
             (2.0**-6, 0x08), (240.0, 0x77), (232.0, 0x76)]
    x = torch.tensor([c[0] for c in cases])
    t = FP8Tensor.from_float(x, scale=1.0, use_kernel=use_kernel)
    assert bits(t.qdata).tolist() == [c[1] for c in cases]
    auto = FP8Tensor.from_float(x, use_kernel=use_kernel)
    assert bits(auto.scale).item() == bits(torch.tensor(1000.0 / 448.0)).item()
    assert FP8Tensor.from_float(torch.zeros(5), use_kernel=use_kernel).scale.item() == 1.0


@PATHS
def test_int8_round_half_even_and_full_range_clamp(use_kernel: bool) -> None:
    x = torch.tensor([2.5, 3.5, -2.5, -0.5, 0.5, 127.4, 200.0, -127.6, -300.0, 1.5])
    t = Int8Tensor.from_float(x, per_channel=False, scale=1.0, use_kernel=use_kernel)
    assert t.qdata.tolist() == [2, 4, -2, 0, 0, 127, 127, -128, -128, 2]


@PATHS
def test_int8_per_channel_scales(use_kernel: bool) -> None:
    w = torch.tensor([[0.5, -1.27, 0.01], [0.0, 0.0, 0.0], [254.0, 1.0, -2.0]])
    t = Int8Tensor.from_float(w, use_kernel=use_kernel)
    assert bits(t.scale).tolist() == bits(torch.tensor([1.27 / 127, 1.0, 254.0 / 127])).tolist()
    assert t.qdata.tolist() == [[50, -127, 1], [0, 0, 0], [127, 0, -1]]
    per_tensor = Int8Tensor.from_float(w, per_channel=False, use_kernel=use_kernel)
    assert per_tensor.scale.shape == () and per_tensor.qdata[2, 0] == 127


@PATHS
def test_int4_packing_order_rounding_and_clamp(use_kernel: bool) -> None:
    w = torch.zeros(2, 128)
    w[0, :8] = torch.tensor([-8.0, 7.0, -1.0, 0.0, 8.0, -9.0, 2.5, 3.5])
    w[1, :8] = torch.tensor([1.0, -2.0, 3.0, -4.0, 5.0, -6.0, 0.5, -0.5])
    t = Int4Tensor.from_float(w, scale=torch.ones(2, 1), use_kernel=use_kernel)
    # byte = code(row 0) & 0xF | (code(row 1) & 0xF) << 4  (ModelOpt pack_int4_in_uint8)
    assert t.qdata.shape == (1, 128)
    assert t.qdata[0, :8].tolist() == [0x18, 0xE7, 0x3F, 0xC0, 0x57, 0xA8, 0x02, 0x04]
    assert t.dequantize()[0, :8].tolist() == [-8.0, 7.0, -1.0, 0.0, 7.0, -8.0, 2.0, 4.0]


@PATHS
def test_int4_group_scales_padding_and_zero_group(use_kernel: bool) -> None:
    w = torch.zeros(4, 130)  # K = 130: groups [0, 128) and [128, 130) (zero-padded to 256)
    w[0, :128] = torch.linspace(-3.5, 7.0, 128)
    w[0, 128:] = torch.tensor([0.45, -1.4])
    w[1, 5] = -14.0
    t = Int4Tensor.from_float(w, use_kernel=use_kernel)
    assert t.qdata.shape == (2, 130) and t.scale.shape == (4, 2)
    amax = torch.tensor([[7.0, 1.4], [14.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    want = torch.where(amax == 0, 1.0, amax / 7.0)  # an all-zero group gets scale 1.0
    assert bits(t.scale).tolist() == bits(want).tolist()
    deq = t.dequantize()
    assert deq[0, 128:].tolist() == pytest.approx([0.4, -1.4], rel=1e-6)  # 0.45 / 0.2 = 2.25 -> 2
    assert deq[1, 5].item() == -14.0 and (deq[2:] == 0).all()


def test_int4_rejects_odd_rows() -> None:
    with pytest.raises(AssertionError):
        Int4Tensor.from_float(torch.ones(3, 128))


@PATHS
def test_nvfp4_kv_searched_block_scale(use_kernel: bool) -> None:
    """s2 = 1. Block A = fifteen 5.0s and a 6.0: the amax scale 1.0 rounds 5.0 to 4.0 (a tie, to the even code), error
    15; f = 1.2 gives scale 1.2 -> FP8 1.25 (0x3A), where 5.0 is exactly code 4.0 and 6.0 -> 4.8 -> 4.0 (5.0), error 1.
    Block B already lies on the E2M1 grid at scale 1.0: every other candidate is worse, 1.0 stays. Block C is zero:
    scale 1.0 (0x38), codes 0, like plain NVFP4."""
    a = [5.0] * 15 + [6.0]
    b = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, 0.0]
    x = torch.tensor([a + b + [0.0] * 16])
    q = quantize_nvfp4_kv(x, 1.0, use_kernel=use_kernel)
    assert bits(q.scale).tolist() == [[0x3A, 0x38, 0x38]]
    assert _codes(q.qdata)[0, :16].tolist() == [6] * 16
    assert torch.equal(q.dequantize()[0, 16:32], torch.tensor(b))
    assert q.qdata[0, 16:].tolist() == [0] * 8
    assert torch.equal(q.dequantize()[0, :16], torch.full((16,), 5.0))


@PATHS
def test_nvfp4_kv_block_error_never_above_plain_nvfp4(use_kernel: bool) -> None:
    """Amax scaling is one of the candidates, so no block decodes worse than ModelOpt's encoding of it."""
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(3)) * torch.rand(128) * 4
    s2 = float(x.abs().amax()) / 2688
    err_kv = (quantize_nvfp4_kv(x, s2, use_kernel=use_kernel).dequantize() - x).view(64, 8, 16).pow(2).sum(-1)
    err_plain = (NVFP4Tensor.from_float(x, s2).dequantize() - x).view(64, 8, 16).pow(2).sum(-1)
    assert (err_kv <= err_plain).all()
    assert err_kv.sum() < 0.9 * err_plain.sum()
