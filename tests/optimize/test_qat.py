"""QAT / QAD on the real default model: the STE gradient, loss going down on a fixed batch, and the 2-process
(gloo) torchrun run of `optiserve qat` whose checkpoint resumes, reloads as PTQ-layout and serves over HTTP."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from optiserve.engine.quant import fake_quant_activation
from optiserve.engine.quantized_checkpoint import is_modelopt_checkpoint
from optiserve.optimize.calibrate import calibrate
from optiserve.optimize.data import training_windows
from optiserve.optimize.distill import DistillLoss, distill_loss_fn
from optiserve.optimize.qat import QATLinear, qat_loss_fn, qat_model, to_quant_result, trainable
from optiserve.optimize.train import STATE_FILE, Dist, TrainConfig, train

from .conftest import serves_chat

FMT = "nvfp4"  # W4A4: the format the targets are about


@pytest.fixture(scope="module")
def batch(engine, train_text) -> list[list[int]]:
    return training_windows(engine.tokenizer, [str(train_text)], 32)[:1]  # one fixed sequence of 32 tokens


@pytest.fixture(scope="module")
def stats(engine, batch):
    return calibrate(engine.master, batch, progress=False)


def test_ste_gradient_reaches_weights(engine, stats):
    student = qat_model(engine.master, FMT, stats)
    layer = student.layers[3].mlp.down
    assert isinstance(layer, QATLinear) and student.layers[3].mlp.down is not engine.master.layers[3].mlp.down
    trainable(student)
    x = torch.randn(2, 5, layer.weight.shape[1])
    layer(x).pow(2).sum().backward()
    # Straight-through: the gradient is that of the quantized layer, taken as if quantization were identity.
    wq = layer.quantized_weight().requires_grad_(True)
    xq = fake_quant_activation(FMT, x, layer.input_scale)
    F.linear(xq, wq).pow(2).sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    torch.testing.assert_close(layer.weight.grad, wq.grad)
    assert not torch.equal(wq.detach(), layer.weight.detach())  # the forward really was quantized


@pytest.mark.parametrize("mode", ["qat", "qad"])
def test_steps_lower_loss_on_fixed_batch(engine, stats, batch, tmp_path, mode):
    # QAT in fp8 (W8A8): the same STE path with a cheaper reference quantizer; QAD in nvfp4, whose KL to the
    # teacher is large enough (~0.5) to go down measurably (fp8 starts at ~0.05, within its rounding noise)
    student = qat_model(engine.master, "fp8" if mode == "qat" else FMT, stats)
    loss_fn = qat_loss_fn(student) if mode == "qat" else distill_loss_fn(student, engine.master, DistillLoss())
    # small steps: Adam's first updates move every weight by ~lr, and QAD starts close to its teacher
    cfg = TrainConfig(steps=2, lr=1e-4 if mode == "qat" else 1e-5, batch_size=1, seq_len=32, progress=False)
    summary = train(trainable(student), loss_fn, batch, cfg, tmp_path, Dist(), mode)
    with torch.no_grad():
        after = loss_fn(torch.tensor(batch))[0].item()
    assert after < summary.first_loss, (summary.losses, after)
    # the packed export computes what the trained fake-quant student computes, layer by layer
    layer = student.layers[0].attn.qkv
    packed = to_quant_result(student).model.layers[0].attn.qkv
    x = torch.randn(3, layer.weight.shape[1])
    with torch.no_grad():
        torch.testing.assert_close(packed(x), layer(x), rtol=1e-4, atol=1e-4)

def torchrun_qat(out, data, steps: int, *extra: str) -> dict:
    summary = out.parent / f"summary-{steps}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "optiserve.server.cli",
           "qat", "--model", "default", "--quant", FMT, "--calib-samples", "2", "--calib-seq-len", "64",
           "--data", str(data), "--steps", str(steps), "--batch-size", "1", "--seq-len", "32", "--lr", "1e-5",
           "--output", str(out), "--json", str(summary), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(summary.read_text())


def test_torchrun_two_process_qat_resumes_and_serves(train_text, tmp_path):
    out = tmp_path / "qat-nvfp4"
    first = torchrun_qat(out, train_text, 1)
    assert first["world_size"] == 2 and first["steps"] == 1 and first["resumed_from"] == 0
    assert (out / STATE_FILE).is_file()
    second = torchrun_qat(out, train_text, 2, "--resume")
    assert second["resumed_from"] == 1 and second["steps"] == 2 and len(second["losses"]) == 2
    assert second["tokens_seen"] == 2 * 2 * 32
    assert is_modelopt_checkpoint(out)
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    assert hf_quant["quant_algo"] == "NVFP4"
    assert serves_chat(out, tmp_path)
