"""Export to ModelOpt's unified HF layout, then serve the checkpoint directly: same greedy tokens as serving the
same PTQ result in memory, and the names / dtypes / quant_algo ModelOpt writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from optiserve.engine.config import EngineConfig, ModelConfig, SamplingParams
from optiserve.engine.layout import rope_row_perm
from optiserve.engine.llm_engine import LLMEngine, WeightSet, run_to_completion
from optiserve.engine.quantized_checkpoint import KV_MEANS_FILE, read_kv_means
from optiserve.engine.weight_formats import FORMATS
from optiserve.optimize.export import export_checkpoint
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized
from tests.conftest import scratch_dir

GREEDY = SamplingParams(temperature=0, max_tokens=16)
CASES = {"nvfp4+kv": ("nvfp4", "nvfp4"), "int4": ("int4", "none"), "fp8+kv": ("fp8", "fp8"), "int8": ("int8", "none"),
         "nvfp4-w4a16": ("nvfp4-w4a16", "none")}


def reference_tokens(engine: LLMEngine, req: QuantRequest, prompts):
    q = prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req)
    engine.use_weights(q)
    try:
        return q, run_to_completion(engine, prompts, GREEDY)
    finally:
        engine.use_weights(WeightSet(engine.master, "none"))


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, engine, chat_prompt_ids, tmp_path_factory):
    quant, kv = CASES[request.param]
    req = QuantRequest(quant, kv, calib_samples=4, calib_seq_len=128)
    prompts = chat_prompt_ids[:3]
    q, ref = reference_tokens(engine, req, prompts)
    with scratch_dir(tmp_path_factory, request.param) as tmp:
        yield req, export_checkpoint(engine.model_dir, q, tmp / "ckpt"), prompts, ref, q


def test_round_trip_same_greedy_tokens(exported):
    req, out, prompts, ref, _ = exported
    served = LLMEngine(EngineConfig(model=str(out), max_batch=4, max_model_len=1024))
    assert served.master is None
    assert (served.weights.weight_format, served.weights.kv_format) == (req.quant, req.kv_cache)
    assert served.runner.cache.kv_format == req.kv_cache
    assert run_to_completion(served, prompts, GREEDY) == ref


def test_names_dtypes_and_config(exported):
    req, out, _, _, q = exported
    hf_quant = json.loads((out / "hf_quant_config.json").read_text())["quantization"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert hf_quant["exclude_modules"] == ["lm_head"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    p = "model.layers.0."
    assert "model.embed_tokens.weight" in t and p + "input_layernorm.weight" in t
    assert not any(k.endswith(("qkv.weight", "gate_up.weight")) for k in t)
    per_tensor = {"fp8": "weight_scale", "nvfp4": "weight_scale_2", "nvfp4-w4a16": "weight_scale_2"}.get(req.quant)
    if per_tensor:  # fused projections share one per-tensor weight scale, as ModelOpt's exporter makes them
        for fused in (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj")):
            scales = [t[f"{p}{proj}.{per_tensor}"] for proj in fused]
            assert all(torch.equal(scales[0], s) for s in scales[1:]), fused
    if req.quant == "nvfp4":
        assert hf_quant["quant_algo"] == "NVFP4" and hf_quant["group_size"] == 16
        assert hf_quant["kv_cache_quant_algo"] == "NVFP4"
        for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                     "mlp.up_proj", "mlp.down_proj"):
            assert t[f"{p}{proj}.weight"].dtype == torch.uint8
            assert t[f"{p}{proj}.weight_scale"].dtype == torch.float8_e4m3fn
            assert t[f"{p}{proj}.weight_scale_2"].dtype == torch.float32 and t[f"{p}{proj}.weight_scale_2"].dim() == 0
            assert t[f"{p}{proj}.input_scale"].dtype == torch.float32
        assert t[p + "self_attn.q_proj.weight"].shape == (576, 288)
        assert t[p + "self_attn.q_proj.weight_scale"].shape == (576, 36)
        assert t[p + "self_attn.k_proj.k_scale"].dtype == torch.float32
        assert t[p + "self_attn.v_proj.v_scale"].dtype == torch.float32
        # the NVFP4 cache's mean keys, beside the ModelOpt layout, read back onto our RoPE layout exactly
        loaded = read_kv_means(out, ModelConfig.from_dir(out))
        assert all(torch.equal(a, b) for a, b in zip(loaded, q.kv.k_means, strict=True))
    else:
        assert not (out / KV_MEANS_FILE).exists()
    if req.quant == "int4":
        assert hf_quant["quant_algo"] == "W4A16_AWQ" and hf_quant["group_size"] == 128
        assert hf_quant["kv_cache_quant_algo"] is None
        assert t[p + "self_attn.q_proj.weight"].dtype == torch.uint8
        assert t[p + "self_attn.q_proj.weight"].shape == (288, 576)
        assert t[p + "mlp.down_proj.weight_scale"].dtype == torch.float32
        assert t[p + "mlp.down_proj.pre_quant_scale"].shape == (1536,)
        assert not any(k.endswith("input_scale") for k in t)
    if req.quant == "nvfp4-w4a16":
        assert hf_quant["quant_algo"] == "W4A16_NVFP4" and hf_quant["group_size"] == 16
        assert t[p + "self_attn.q_proj.weight"].dtype == torch.uint8
        assert t[p + "self_attn.q_proj.weight_scale"].dtype == torch.float8_e4m3fn
        assert t[p + "self_attn.q_proj.weight_scale_2"].dim() == 0
        assert not any(k.endswith(("input_scale", "k_scale")) for k in t)
    if req.quant == "fp8":
        assert hf_quant["quant_algo"] == "FP8" and hf_quant["kv_cache_quant_algo"] == "FP8"
        assert t[p + "self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
        assert t[p + "self_attn.q_proj.weight"].shape == (576, 576)
        for name in ("weight_scale", "input_scale"):
            assert t[f"{p}mlp.down_proj.{name}"].dtype == torch.float32 and t[f"{p}mlp.down_proj.{name}"].dim() == 0
        assert t[p + "self_attn.k_proj.k_scale"].dim() == 0 and t[p + "self_attn.v_proj.v_scale"].dim() == 0
        assert not any(k.endswith(("weight_scale_2", "pre_quant_scale")) for k in t)
    if req.quant == "int8":
        assert hf_quant["quant_algo"] == "W8A8_SQ_PER_CHANNEL" and hf_quant["kv_cache_quant_algo"] is None
        assert t[p + "self_attn.q_proj.weight"].dtype == torch.int8
        assert t[p + "self_attn.q_proj.weight_scale"].shape == (576,)
        assert t[p + "mlp.down_proj.input_scale"].dim() == 0
        assert t[p + "mlp.down_proj.pre_quant_scale"].shape == (1536,)


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_rope_row_permutation_commutes_with_packing(fmt):
    """Permuting packed rows (scales too; int4 unpacked and repacked) equals quantizing the permuted rows."""
    w = torch.randn(4 * 64, 256)
    perm = rope_row_perm(4, 64, to_hf=True)
    packed = fmt.permute_rows(fmt.quantize(w, None), perm)
    assert torch.equal(packed.dequantize(torch.float32), fmt.quantize(w, None).dequantize(torch.float32)[perm])
    assert torch.equal(fmt.permute_rows(packed, rope_row_perm(4, 64, to_hf=False)).qdata, fmt.quantize(w, None).qdata)
