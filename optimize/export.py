"""Export a PTQ result as a Hugging Face checkpoint in NVIDIA ModelOpt's unified export layout.

What `modelopt.torch.export.export_hf_checkpoint` writes (see engine/quantized_checkpoint.py for tensor names,
dtypes and shapes): safetensors with one entry set per HF projection (un-fused, q/k rows back in HF's half-split
RoPE order), `hf_quant_config.json` ({"producer", "quantization": {"quant_algo", "kv_cache_quant_algo",
"group_size", "exclude_modules", ...}}), `config.json` with `quantization_config` (`convert_hf_quant_config_format`,
`quant_method: "modelopt"`), plus the source's tokenizer files and generation_config.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch

from optiserve.engine.config import ModelConfig
from optiserve.engine.kv_quant import KV_CACHE_FORMATS, KVFormat, kv_scale_to_modelopt
from optiserve.engine.layout import HF_LAYER, LAYER_LINEARS, LAYER_NORMS, MODEL_TENSORS, LayerLinear, rope_row_perm
from optiserve.engine.quant import QuantLinear
from optiserve.engine.quantized_checkpoint import HF_QUANT_CONFIG, KV_MEANS_FILE
from optiserve.engine.weight_formats import BY_QUANT_ALGO, FORMATS
from optiserve.engine.weight_set import WeightSet

from .train import STATE_FILE

log = logging.getLogger(__name__)
MODELOPT_VERSION = "0.47.0"  # the ModelOpt release whose export layout this follows
SKIP_FILES = {"config.json", HF_QUANT_CONFIG, "optiserve-converted.json", STATE_FILE, KV_MEANS_FILE}


def hf_quant_config(weight_format: str, kv_format: str) -> dict:
    """hf_quant_config.json, as `get_quant_config` + `process_layer_quant_config` build it for one format."""
    quant: dict = {"quant_algo": None, "kv_cache_quant_algo": None}
    if weight_format != "none":
        fmt = FORMATS[weight_format]
        quant["quant_algo"] = fmt.modelopt.quant_algo
        if fmt.group_size is not None:
            quant["group_size"] = fmt.group_size
        quant.update(fmt.modelopt.extra_config)
        quant["exclude_modules"] = ["lm_head"]  # ModelOpt leaves the LM head unquantized (a disabled quantizer)
    if kv_format != "none":
        quant["kv_cache_quant_algo"] = KV_CACHE_FORMATS[kv_format].kv_cache_quant_algo
    return {"producer": {"name": "modelopt", "version": MODELOPT_VERSION}, "quantization": quant}


def hf_quantization_config(hf_quant: dict) -> dict:
    """config.json's `quantization_config`: ModelOpt's `convert_hf_quant_config_format` for our formats."""
    q = hf_quant["quantization"]
    algo, out = q.get("quant_algo"), {}
    group = BY_QUANT_ALGO[algo].modelopt.config_group if algo else None
    if group is not None:
        out["config_groups"] = {"group_0": group}
    out["ignore"] = q.get("exclude_modules") or []
    if algo:
        out["quant_algo"] = algo
    kv = q.get("kv_cache_quant_algo")
    if kv:
        out["kv_cache_scheme"] = {"dynamic": False, "num_bits": 8, "type": "float"} if kv == "FP8" else kv
    out["producer"] = hf_quant["producer"]
    out["quant_method"] = "modelopt"
    return out


def export_state_dict(weights: WeightSet) -> dict[str, torch.Tensor]:
    """Our (quantized) `Transformer` -> the HF state dict ModelOpt would write."""
    model, kv = weights.model, weights.kv
    cfg = model.cfg
    out = {hf: model.get_parameter(ours) for ours, hf in MODEL_TENSORS.items()}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    for i, layer in enumerate(model.layers):
        hf_layer = HF_LAYER.format(i=i)
        out.update({hf_layer + hf: layer.get_parameter(ours) for ours, hf in LAYER_NORMS.items()})
        for linear in LAYER_LINEARS:
            module = layer.get_submodule(linear.ours)
            if isinstance(module, QuantLinear):
                out.update(packed_projections(module, linear, cfg, i, weights.weight_format))
            else:
                out.update(split_projections(module.weight, linear, cfg, i, "weight"))
            if module.bias is not None:  # q/k/v biases (qwen2)
                out.update(split_projections(module.bias, linear, cfg, i, "bias"))
        if kv.name != "none":
            out[hf_layer + "self_attn.k_proj.k_scale"] = kv_scale_to_modelopt(kv.name, kv.k_scales[i])
            out[hf_layer + "self_attn.v_proj.v_scale"] = kv_scale_to_modelopt(kv.name, kv.v_scales[i])
    return {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def split_projections(t: torch.Tensor, linear: LayerLinear, cfg: ModelConfig, i: int,
                      suffix: str) -> dict[str, torch.Tensor]:
    """A float weight [out, in] (or bias [out]) of one of our linears as HF's projections, q/k rows half-split."""
    out = {}
    for proj, part in zip(linear.projections, t.split(linear.rows(cfg)), strict=True):
        perm = proj.row_perm(cfg, to_hf=True)
        out[f"{linear.hf_prefix(i)}{proj.name}.{suffix}"] = part if perm is None else part[perm]
    return out


def packed_projections(module: QuantLinear, linear: LayerLinear, cfg: ModelConfig, i: int,
                       weight_format: str) -> dict[str, torch.Tensor]:
    """A `QuantLinear`'s shards as HF projections in ModelOpt's tensor names, q/k rows half-split."""
    assert module.fmt == weight_format, (module.fmt, weight_format)
    fmt, out = module.format, {}
    for proj, shard in zip(linear.projections, module.shards, strict=True):
        key = f"{linear.hf_prefix(i)}{proj.name}."
        perm = proj.row_perm(cfg, to_hf=True)
        shard = shard if perm is None else fmt.permute_rows(shard, perm)
        out.update({key + k: v for k, v in fmt.modelopt.to_tensors(shard).items()})
        if fmt.quantizes_activations:
            out[key + "input_scale"] = module.input_scale.float().reshape(())
        if module.pre_quant_scale is not None:
            out[key + "pre_quant_scale"] = module.pre_quant_scale
    return out


def write_kv_means(output: Path, kv: KVFormat, head_dim: int) -> None:
    """The NVFP4 cache's mean keys beside the checkpoint (HF's half-split channel order): ModelOpt's layout has no
    place for them, and runtimes that do not centre keys ignore the file."""
    if kv.k_means is None:
        return
    means = torch.stack(kv.k_means).float()[..., rope_row_perm(1, head_dim, to_hf=True)]  # [L, KV, D]
    (output / KV_MEANS_FILE).write_text(json.dumps({"k_mean": means.tolist()}))


def export_checkpoint(source_dir: Path, weights: WeightSet, output: Path, config_updates: dict | None = None) -> Path:
    """Write `weights` to `output` in ModelOpt's unified HF layout (formats "none": a plain HF checkpoint);
    tokenizer etc. are copied from `source_dir`, its config.json with `config_updates` (a pruned model's sizes)."""
    from safetensors.torch import save_file

    source_dir, output = Path(source_dir), Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for f in source_dir.iterdir():
        if f.is_file() and f.name not in SKIP_FILES and not f.name.endswith((".safetensors", ".bin", ".gguf")) \
                and not f.name.startswith("model.safetensors"):
            shutil.copy2(f, output / f.name)
    weight_format, kv_format = weights.weight_format, weights.kv_format
    state = export_state_dict(weights)
    write_kv_means(output, weights.kv, weights.model.cfg.head_dim)
    save_file(state, str(output / "model.safetensors"), metadata={"format": "pt"})
    config = {**json.loads((source_dir / "config.json").read_text()), **(config_updates or {})}
    ModelConfig.from_dict(config)  # the architecture we can serve again
    config.pop("quantization_config", None)
    hf_quant = hf_quant_config(weight_format, kv_format)
    if weight_format != "none" or kv_format != "none":
        (output / HF_QUANT_CONFIG).write_text(json.dumps(hf_quant, indent=4))
        config["quantization_config"] = hf_quantization_config(hf_quant)
    (output / "config.json").write_text(json.dumps(config, indent=4))
    log.info("wrote %s (%s, KV %s)", output, weight_format, kv_format)
    return output
