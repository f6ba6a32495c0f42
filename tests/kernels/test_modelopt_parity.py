"""Optional: bit-for-bit parity with NVIDIA ModelOpt itself (`pip install --no-deps nvidia-modelopt` + its imports).

ModelOpt runs in a subprocess so that importing it (it registers plugins and patches libraries) cannot affect the
other tests in this pytest process. Skipped only when ModelOpt cannot be imported.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from optiserve.kernels import FP8Tensor, Int4Tensor, Int8Tensor, NVFP4Tensor
from tests.kernels.utils import assert_bits_equal, wide_range

MODELOPT_SCRIPT = r"""
import sys, warnings
warnings.filterwarnings("ignore")
import torch
try:
    from modelopt.torch.export.quant_utils import (from_quantized_weight, get_scaling_factor_from_weight,
                                                   pack_int4_in_uint8, to_quantized_weight)
    from modelopt.torch.quantization.qtensor import FP8QTensor, INT8QTensor, NVFP4QTensor
except ImportError as e:
    print(e)
    sys.exit(3)
inputs, out = torch.load(sys.argv[1]), {}
for name, x in inputs.items():
    q, s, s2 = NVFP4QTensor.quantize(x.clone(), 16)
    deq = q.dequantize(dtype=x.dtype, scale=s, double_scale=s2, block_sizes={-1: 16})
    s2c = x.abs().amax().float() / 2688.0 / 8
    qa, sa, _ = NVFP4QTensor.quantize(x.clone(), 16, weights_scaling_factor_2=s2c)
    fp8_scale = x.abs().amax().float() / 448.0
    fp8 = FP8QTensor.quantize(x, fp8_scale)[0]._quantized_data
    if x.dim() == 2:  # the export path too (for 3-D MoE weights it divides by a [1] scale, i.e. in fp32: not used)
        assert torch.equal(fp8.view(torch.uint8), to_quantized_weight(x, fp8_scale, "fp8").view(torch.uint8))
    out[name] = dict(nvfp4=(q._quantized_data, s, s2, deq), nvfp4_act=(qa._quantized_data, sa, s2c),
                     fp8=(fp8, fp8_scale, from_quantized_weight(fp8, fp8_scale, "fp8", x.dtype)))
    if x.dim() == 2:
        s8 = get_scaling_factor_from_weight(x, 0)
        q8 = to_quantized_weight(x, s8, "int8_sq")
        out[name]["int8"] = (q8, s8, from_quantized_weight(q8, s8, "int8_sq", x.dtype))
        s8t = x.abs().amax().float() / 127.0  # per-tensor (activation) scale, fp32 as exported
        q8t = INT8QTensor.quantize(x, scales=s8t)[0]
        out[name]["int8_per_tensor"] = (q8t._quantized_data, q8t.dequantize(scale=s8t))
        s4 = get_scaling_factor_from_weight(x, 128)
        try:
            q4 = pack_int4_in_uint8(x, s4, 128)
        except TypeError:  # older ModelOpt: pack_int4_in_uint8(weight, weights_scaling_factor)
            q4 = pack_int4_in_uint8(x, s4)
        out[name]["int4"] = (q4, s4)
torch.save(out, sys.argv[2])
"""


def _inputs() -> dict[str, torch.Tensor]:
    xs = {}
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        xs[f"w_{dtype}"] = wide_range((8, 384), seed=11, dtype=dtype)
        xs[f"act_{dtype}"] = wide_range((2, 3, 64), seed=12, dtype=dtype)
    return xs


def test_bit_exact_against_modelopt(tmp_path: Path) -> None:
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed")
    inputs = _inputs()
    torch.save(inputs, tmp_path / "in.pt")
    proc = subprocess.run([sys.executable, "-c", MODELOPT_SCRIPT, str(tmp_path / "in.pt"), str(tmp_path / "out.pt")],
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"modelopt is not importable: {proc.stdout.strip()[-300:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = torch.load(tmp_path / "out.pt")
    for name, x in inputs.items():
        for use_kernel in (False, True):
            r = ref[name]
            t = NVFP4Tensor.from_float(x, use_kernel=use_kernel)
            for got, want in zip((t.qdata, t.scale, t.per_tensor_scale, t.dequantize()), r["nvfp4"], strict=True):
                assert_bits_equal(got, want)
            a = NVFP4Tensor.from_float(x, r["nvfp4_act"][2], use_kernel=use_kernel)
            for got, want in zip((a.qdata, a.scale), r["nvfp4_act"][:2], strict=True):
                assert_bits_equal(got, want)
            f = FP8Tensor.from_float(x, use_kernel=use_kernel)
            for got, want in zip((f.qdata, f.scale, f.dequantize()), r["fp8"], strict=True):
                assert_bits_equal(got, want)
            if x.dim() == 2:
                i8 = Int8Tensor.from_float(x, use_kernel=use_kernel)
                for got, want in zip((i8.qdata, i8.scale, i8.dequantize()), r["int8"], strict=True):
                    assert_bits_equal(got, want)
                i8t = Int8Tensor.from_float(x, per_channel=False, use_kernel=use_kernel)
                for got, want in zip((i8t.qdata, i8t.dequantize()), r["int8_per_tensor"], strict=True):
                    assert_bits_equal(got, want)
                i4 = Int4Tensor.from_float(x, use_kernel=use_kernel)
                assert_bits_equal(i4.qdata, r["int4"][0])
                assert_bits_equal(i4.scale, r["int4"][1])
