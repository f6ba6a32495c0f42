"""`optiserve eval --compare-modelopt`, run for real on a tiny setting: both columns, the same unquantized model.

Skipped only when NVIDIA ModelOpt cannot be imported (it runs in its own subprocess, as in the parity test).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optiserve.engine.weights import resolve_model_dir

EVAL = [sys.executable, "-m", "optiserve.server.cli", "eval", "--window", "64", "--max-windows", "2",
        "--calib-samples", "2", "--calib-seq-len", "64", "--compare-modelopt"]
RESULT_KEYS = ("perplexity", "reference_perplexity", "kl_divergence", "top1_agreement")


def run_eval(*args: str) -> subprocess.CompletedProcess:
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("nvidia-modelopt is not installed")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a tiny run: one thread is fastest, above all on a busy machine
    proc = subprocess.run([*EVAL, *args], capture_output=True, text=True, timeout=600, env=env)
    if "modelopt is installed but cannot be imported" in proc.stderr:
        pytest.skip(f"modelopt is not importable: {proc.stderr.strip()[-300:]}")
    return proc


def test_fp8_both_columns(held_out_text: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp8.json"
    proc = run_eval("--quant", "fp8", "--data", str(held_out_text), "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FP8_DEFAULT_CFG" in proc.stdout and "top-1 agreement" in proc.stdout
    report = json.loads(out.read_text())
    ours, theirs = report, report["modelopt"]
    assert theirs["method"] == "FP8_DEFAULT_CFG"
    layers = json.loads((resolve_model_dir("default") / "config.json").read_text())["num_hidden_layers"]
    assert theirs["quantized_linears"] == 7 * layers  # q, k, v, o, gate, up, down; not the LM head
    for res in (ours, theirs):
        assert (res["windows"], res["tokens"]) == (2, 2 * 63)
        assert all(math.isfinite(res[k]) for k in RESULT_KEYS), res
        assert res["kl_divergence"] > 0 and 0 < res["top1_agreement"] <= 1
    # the same unquantized model on the same windows: our engine and HF transformers agree
    assert theirs["reference_perplexity"] == pytest.approx(ours["reference_perplexity"], rel=1e-3)


def test_bad_combination_is_a_clear_error(held_out_text: Path) -> None:
    proc = run_eval("--quant", "fp8", "--dtype", "bfloat16", "--data", str(held_out_text))
    assert proc.returncode != 0
    assert "optiserve: error: --compare-modelopt" in proc.stderr
    assert "Traceback" not in proc.stderr
