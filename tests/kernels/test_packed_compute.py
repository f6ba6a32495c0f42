"""The GPU compute path, run on the CPU: `QuantLinear(compute="packed")` multiplies from the packed tensors (Triton
dequantize-GEMMs through the interpreter, `torch._scaled_mm`, `torch._int_mm`) and must give the numbers of the
compute copy the CPU engine serves from, up to summation order."""

from __future__ import annotations

import pytest
import torch

from optiserve.engine.quant import QuantLinear, quantize_weight, weight_bytes
from optiserve.engine.runner import ModelRunner
from optiserve.optimize.ptq import with_layers
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized

FORMATS = ["fp8", "int8", "nvfp4", "nvfp4-w4a16", "int4", "int4-w4a8"]
ACTIVATION_DIVISOR = {"fp8": 448.0, "int8": 127.0, "nvfp4": 6 * 448.0}  # amax -> the calibrated input_scale


def packed_copy(layer: QuantLinear, use_kernel: bool | None = True) -> QuantLinear:
    """The same packed shards and scales, computed the GPU's way."""
    return QuantLinear(layer.fmt, layer.shards, layer.bias, layer.input_scale, layer.pre_quant_scale, layer.dtype,
                       compute="packed", use_kernel=use_kernel)


def copy_of(layer: QuantLinear) -> QuantLinear:
    """The same packed shards and scales, computed from an fp32 compute copy."""
    return QuantLinear(layer.fmt, layer.shards, layer.bias, layer.input_scale, layer.pre_quant_scale, layer.dtype,
                       compute="copy")


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("use_kernel", [True, False], ids=["triton", "torch"])
def test_packed_linear_matches_the_compute_copy(fmt, use_kernel):
    g = torch.Generator().manual_seed(0)
    w_q, w_k = torch.randn(64, 256, generator=g), torch.randn(32, 256, generator=g)  # two fused shards
    x = torch.randn(3, 7, 256, generator=g)  # [B, S, K]: 21 rows, two row blocks of the GEMM kernels
    input_scale = torch.tensor(x.abs().max().item() / ACTIVATION_DIVISOR.get(fmt, 1.0))
    copy = QuantLinear(fmt, [quantize_weight(fmt, w_q), quantize_weight(fmt, w_k)], torch.randn(96, generator=g),
                       input_scale, torch.rand(256, generator=g) + 0.5, torch.float32, compute="copy")
    packed = packed_copy(copy, use_kernel)
    assert not hasattr(packed, "weight_t")  # no dequantized copy is held
    y, y_ref = packed(x), copy(x)
    assert y.shape == y_ref.shape == (3, 7, 96) and y.dtype == y_ref.dtype
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4 * y_ref.abs().max().item())
    assert torch.equal(packed.weight, copy.weight)
    assert packed.resident_bytes() == packed.packed_bytes() < copy.resident_bytes()


def test_int8_packed_sums_are_exact_integers():
    """`torch._int_mm` sums the int8 codes exactly: scaling back gives the fp64 product of the dequantized values."""
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(48, 128, generator=g), torch.randn(7, 128, generator=g)
    layer = packed_copy(QuantLinear("int8", [quantize_weight("int8", w)], None,
                                    torch.tensor(x.abs().max().item() / 127), None, torch.float32), False)
    xq = torch.clamp(torch.round(x / layer.input_scale), -128, 127)
    expected = (xq.double() @ layer.shards[0].qdata.double().t()) * layer.input_scale.double() \
        * layer.shards[0].scale.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


def quantized_default_model(engine, fmt: str):
    """The default model after PTQ to `fmt` (a small calibration set keeps it quick; it is cached)."""
    req = QuantRequest(fmt, calib_samples=4, calib_seq_len=64)
    return prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req).model


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_layers_on_real_activations(engine, chat_prompt_ids, fmt):
    """The default model after PTQ, on a chat prompt: the first layer's four projections (K = 576 and 1536, fused
    q/k/v and gate/up, AWQ/SmoothQuant pre_quant_scale) computed from the packed tensors by the GPU kernels
    (interpreted Triton for NVFP4/INT4) give what the compute copy gives, on the activations the model produced.
    (Model-level W4A4 logits are not compared this way: a last-bit difference can flip an activation's 4-bit code
    in a later layer, which then moves the logits by a whole quantization step.)"""
    q = quantized_default_model(engine, fmt)
    inputs: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in q.named_modules() if isinstance(m, QuantLinear) and n.startswith("layers.0.")}
    hooks = [m.register_forward_pre_hook(lambda _, args, n=n: inputs.__setitem__(n, args[0].clone()))
             for n, m in linears.items()]
    fused = {n: m.fused for n, m in linears.items()}  # the fused layer steps call no module: the hooks need them
    try:
        for m in linears.values():
            m.fused = None
        ids = chat_prompt_ids[0][:20]  # 20 rows: two row blocks of the GEMM kernels
        ModelRunner(q, 1, len(ids), torch.float32).prefill(0, ids)
    finally:
        for n, m in linears.items():
            m.fused = fused[n]
        for h in hooks:
            h.remove()
    assert sorted(inputs) == sorted(linears) and len(linears) == 4  # qkv, o, gate_up, down
    with torch.inference_mode():
        for name, layer in linears.items():
            y_ref = layer(inputs[name])
            y = packed_copy(layer)(inputs[name])
            torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5 * y_ref.abs().max().item(), msg=name)


@pytest.mark.parametrize("fmt", ["nvfp4-w4a16", "int4"])
def test_packed_model_gives_the_served_logits(engine, chat_prompt_ids, fmt):
    """Every linear of the quantized default model computed from its packed tensors (torch reference GEMMs: the
    interpreter is too slow for 30 layers): the same logits and greedy tokens at every prompt position, and the
    model holds no float copy of those weights. Weight-only formats, so no activation code can flip."""
    q = quantized_default_model(engine, fmt)
    packed = with_layers(q, {n: packed_copy(m, use_kernel=False) for n, m in q.named_modules()
                             if isinstance(m, QuantLinear)})
    ids = chat_prompt_ids[1]
    logits = ModelRunner(packed, 1, len(ids), torch.float32).prefill(0, ids, all_logits=True)  # [S, V]
    expected = ModelRunner(q, 1, len(ids), torch.float32).prefill(0, ids, all_logits=True)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-4 * expected.abs().max().item())
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))
    copy = with_layers(q, {n: copy_of(m) for n, m in q.named_modules() if isinstance(m, QuantLinear)})
    (fmt_bytes, resident), (_, copy_resident) = weight_bytes(packed), weight_bytes(copy)
    assert resident == fmt_bytes < copy_resident
