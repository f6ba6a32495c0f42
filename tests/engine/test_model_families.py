"""Small random Llama / Qwen2 / Mistral checkpoints saved by transformers load and match HF's logits."""

import subprocess
import sys

import pytest
import torch

from optiserve.engine.config import EngineConfig, ModelLoadError
from optiserve.engine.kv_cache import CacheShape, KVCache
from optiserve.engine.runner import ModelRunner, attention_mask
from optiserve.engine.spec.decoder import make_spec_decoder
from optiserve.engine.spec.draft_head import DraftConfig, DraftHead
from optiserve.engine.spec.drafters import EagleDrafter
from optiserve.engine.weights import load_model, resolve_model_dir

COMMON = {"vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128}


def make_checkpoint(tmp_path, family: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    torch.manual_seed(0)
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        model = LlamaForCausalLM(LlamaConfig(**COMMON, rope_parameters=rope, tie_word_embeddings=False))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**COMMON, tie_word_embeddings=True))
        with torch.no_grad():  # random biases so the bias path is exercised
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_()
    else:
        model = MistralForCausalLM(MistralConfig(**COMMON, sliding_window=8, head_dim=32))
    model.eval().save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("family", ["llama3", "qwen2", "mistral"])
def test_family_logits_match_hf(tmp_path, family):
    hf = make_checkpoint(tmp_path, family)
    ours = load_model(resolve_model_dir(str(tmp_path)), max_len=64, dtype=torch.float32)
    cfg = ours.cfg
    ids = torch.randint(0, 256, (1, 24))
    cache = KVCache(CacheShape(cfg.num_layers, 1, cfg.num_kv_heads, 64, cfg.head_dim), torch.float32)
    positions = torch.arange(24).unsqueeze(0)
    cache.begin(0, [24])
    mask = attention_mask(positions, 24, cfg.group_size, cfg.sliding_window)
    with torch.inference_mode():
        got = ours(ids, positions, cache, mask, all_logits=True)[0]
        ref = hf(ids).logits[0]
    assert (got - ref).abs().max().item() < 1e-4


def test_missing_or_unsupported_model_fails_with_reason(tmp_path):
    with pytest.raises(ModelLoadError, match="neither"):
        resolve_model_dir(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(ModelLoadError, match="unsupported model_type"):
        resolve_model_dir(str(tmp_path))


def test_serve_cli_reports_bad_model_in_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "optiserve.server.cli", "serve", "--model", str(tmp_path / "x")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("optiserve: error:")


def test_a_sliding_window_model_drafts_a_chain_unless_a_tree_is_asked(tmp_path):
    """A draft head's default shape is a tree, whose masks have no sliding window: a Mistral target gets the
    chain instead; a tree asked for explicitly is refused with the reason."""
    make_checkpoint(tmp_path, "mistral")
    model = load_model(resolve_model_dir(str(tmp_path)), max_len=64, dtype=torch.float32)
    cfg = model.cfg
    head = DraftConfig(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size,
                       cfg.rms_norm_eps, cfg.vocab_size, cfg.vocab_size, (0, 1, 1))
    DraftHead(head).save(tmp_path / "head")
    runner = ModelRunner(model, 1, 64, torch.float32)
    spec = make_spec_decoder(EngineConfig(speculative=str(tmp_path / "head")), runner, tmp_path)
    assert isinstance(spec.drafter, EagleDrafter) and spec.drafter.max_draft_tokens == 5
    with pytest.raises(ModelLoadError, match="sliding window"):
        make_spec_decoder(EngineConfig(speculative=str(tmp_path / "head"), speculative_eagle_topk=3), runner, tmp_path)
