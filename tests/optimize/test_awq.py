"""INT4 AWQ on the real default model: the clipping search only ever lowers the sampled output error, and what
PTQ exports is still ModelOpt's INT4_AWQ format (group scale = clipped group amax / 7, pre_quant_scale = 1/s)."""

from __future__ import annotations

import pytest
import torch

from optiserve.kernels.int4 import (
    Int4Tensor,
    int4_group_scale,
    int4_groups,
    int4_scale_from_amax,
    unpack_int4_reference,
)
from optiserve.optimize.awq import (
    awq,
    fake_int4,
    group_amax,
    input_gram,
    search_alpha,
    search_clip,
)
from optiserve.optimize.calibrate import calibrate, quantizable_linears
from optiserve.optimize.data import default_calib_path, read_texts, token_windows
from optiserve.optimize.ptq import plan_linear, quant_linear, shard_sizes

LAYER = 3
LINEARS = [f"layers.{LAYER}.{n}" for n in ("attn.qkv", "attn.o", "mlp.gate_up", "mlp.down")]
REL_TOL = 1e-4  # the searches score with the Gram form in fp32; the checks recompute on the rows directly


@pytest.fixture(scope="module")
def stats(engine):
    windows = token_windows(engine.tokenizer, read_texts(default_calib_path(), engine.tokenizer), 256, 4)
    return calibrate(engine.master, windows, progress=False)


def group_errors(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Per (output row, group) mean squared output contribution error [out, G] over the rows x [R, in]."""
    xg = int4_groups(x)  # [R, G, 128]
    d = int4_groups(w_q - w)  # [out, G, 128]
    return torch.einsum("rgk,ogk->rog", xg.double(), d.double()).pow(2).mean(0)


def output_error(x: torch.Tensor, w: torch.Tensor, w_q: torch.Tensor) -> float:
    return (x.double() @ (w_q - w).double().t()).pow(2).mean().item()


def test_fake_int4_is_what_int4_tensor_dequantizes():
    torch.manual_seed(0)
    w = torch.randn(64, 320)  # 2.5 groups: the last is zero-padded
    amax = group_amax(w) * torch.rand(64, 3).clamp_min(0.3)  # clipped groups, so codes clamp (and reach -8)
    packed = Int4Tensor.from_float(w, scale=int4_scale_from_amax(amax))
    assert torch.equal(fake_int4(w, amax), packed.dequantize(torch.float32))
    assert unpack_int4_reference(packed.qdata).min().item() == -8


@pytest.mark.parametrize("name", LINEARS)
def test_clip_search_never_increases_sampled_output_error(engine, stats, name):
    w = quantizable_linears(engine.master)[name].weight.float()  # [out, in]
    layer_stats = stats.linears[name]
    x = layer_stats.sample_rows()  # [R, in]
    s, _ = search_alpha(w, layer_stats.channel_mean, input_gram(x))
    ws, xs = w * s, x / s  # the smoothed layer: same float outputs
    plain = group_amax(ws)
    clipped = search_clip(ws, input_gram(xs))
    assert (clipped <= plain).all() and (clipped < plain).any()  # it shrinks, never grows, and does shrink some
    before = group_errors(xs, ws, fake_int4(ws, plain))
    after = group_errors(xs, ws, fake_int4(ws, clipped))
    assert (after <= before * (1 + REL_TOL) + 1e-12).all()
    assert after.sum() < before.sum()
    # and the whole layer, as `awq` returns it (cross-group terms included)
    found = awq(layer_stats, w)
    assert output_error(x, w, fake_int4(w * found.scale, found.group_amax) / found.scale) <= (
        output_error(x, w, fake_int4(ws, plain) / s) * (1 + REL_TOL))


def test_int4_plan_exports_clipped_amax_over_7(engine, stats):
    name = LINEARS[2]  # gate_up: two shards, so the scales must be split with the rows
    model = engine.master
    linear = quantizable_linears(model)[name]
    w, sizes = linear.weight.float(), shard_sizes(model, name)
    found = awq(stats.linears[name], w)
    plan = plan_linear("int4", name, w, stats.linears[name], sizes, 1.0)
    layer = quant_linear("int4", plan, linear.bias, torch.float32)
    assert torch.equal(layer.pre_quant_scale, 1.0 / found.scale)
    for shard, amax, smoothed in zip(layer.shards, found.group_amax.split(sizes), plan.shards, strict=True):
        assert isinstance(shard, Int4Tensor)
        assert torch.equal(shard.scale, amax / 7)  # ModelOpt's meaning: amax / maxbound, of the clipped group
        assert (amax <= group_amax(smoothed)).all()  # a clipped amax never exceeds the group's own
        assert (shard.scale <= int4_group_scale(smoothed)).all()
    assert torch.equal(layer.weight, fake_int4(w * found.scale, found.group_amax))
