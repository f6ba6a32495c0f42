"""Pruning and distillation on the real default model: impossible targets fail clearly, pruned checkpoints load in
our engine and in HF transformers with the same logits, distillation beats pruning alone on held-out text, and
the pruned and distilled checkpoints serve over HTTP."""

from __future__ import annotations

import json

import pytest
import torch

from optiserve.engine.config import EngineConfig, ModelConfig, SamplingParams
from optiserve.engine.llm_engine import LLMEngine, run_to_completion
from optiserve.engine.weights import load_model
from optiserve.optimize.data import read_texts, token_windows
from optiserve.optimize.distill import DistillLoss, run_distill
from optiserve.optimize.evaluate import evaluate
from optiserve.optimize.prune import PruneRequest, count_params, run_prune
from optiserve.optimize.train import TrainConfig
from optiserve.server.cli import main
from tests.conftest import scratch_dir

from .conftest import serves_chat


def test_impossible_targets_exit_with_an_error(engine, tmp_path, capsys):
    total = count_params(ModelConfig.from_dir(engine.model_dir))
    for target, axis, words in ((total + 1, "depth", "is not below"), (1000, "width", "is below the smallest")):
        with pytest.raises(SystemExit) as e:
            main(["prune", "--target-params", str(target), "--axis", axis, "--output", str(tmp_path / "x")])
        assert str(e.value).startswith("optiserve: error:") and words in str(e.value)
    assert not (tmp_path / "x").exists()


@pytest.fixture(scope="module")
def pruned(engine, train_text, tmp_path_factory):
    """Depth: one layer fewer; width: MLP channels (and what else fits) down to ~88% of the parameters."""
    total = count_params(ModelConfig.from_dir(engine.model_dir))
    with scratch_dir(tmp_path_factory, "pruned") as tmp:
        out = {}
        for axis, target in (("depth", total - 3_000_000), ("width", int(total * 0.88))):
            path = tmp / f"pruned-{axis}"
            summary = run_prune("default", PruneRequest(target, axis), str(path), [str(train_text)], 1, 32)
            assert summary["params_after"] <= target
            out[axis] = path
        yield out


@pytest.mark.parametrize("axis", ["depth", "width"])
def test_pruned_checkpoint_loads_and_generates(pruned, chat_prompt_ids, axis):
    from transformers import AutoModelForCausalLM

    path = pruned[axis]
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["num_hidden_layers"] == (29 if axis == "depth" else 30)
    ours = LLMEngine(EngineConfig(model=str(path), max_batch=2, max_model_len=256))
    tokens = run_to_completion(ours, chat_prompt_ids[:1], SamplingParams(temperature=0, max_tokens=8))[0]
    assert len(tokens) > 0
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == count_params(ModelConfig.from_dir(path))
    ids = chat_prompt_ids[0]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0, -1]
    ours_logits = ours.runner.prefill(0, ids)
    torch.testing.assert_close(ours_logits, ref, rtol=1e-3, atol=1e-3)


def test_distill_improves_over_pruned_only_and_serves(engine, pruned, train_text, held_out_text, tmp_path):
    student_dir = pruned["width"]
    out = tmp_path / "distilled"
    cfg = TrainConfig(steps=3, lr=2e-5, batch_size=2, seq_len=64, progress=False)
    run_distill(str(student_dir), "default", [str(train_text)], str(out), cfg, DistillLoss())
    held_out = token_windows(engine.tokenizer, read_texts(held_out_text), 128, 2)  # never trained on
    before = evaluate(load_model(student_dir, 128, torch.float32), held_out, progress=False).perplexity
    after = evaluate(load_model(out, 128, torch.float32), held_out, progress=False).perplexity
    assert after < before, (before, after)
    for checkpoint in (out, pruned["depth"]):
        assert serves_chat(checkpoint, tmp_path)
