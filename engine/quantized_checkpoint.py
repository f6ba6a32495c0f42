"""Checkpoints in NVIDIA ModelOpt's unified Hugging Face export layout, read back to serve them (export, which
`optiserve quantize` and the PTQ cache run, is optimize/export.py). A format's `quant_algo`, tensor names and
conversions are its record's `modelopt` (engine/weight_formats/).

Layout (ModelOpt `modelopt/torch/export/unified_export_hf.py` `_export_quantized_weight` / `_write_hf_export_config`,
`quant_utils.py` `process_layer_quant_config` / `postprocess_state_dict`, `convert_hf_config.py`
`convert_hf_quant_config_format`), per HF projection `model.layers.{i}.self_attn.{q,k,v,o}_proj` and
`model.layers.{i}.mlp.{gate,up,down}_proj`:
  weight          nvfp4: uint8 [N, K/2] (two E2M1 codes, even index low nibble); fp8: float8_e4m3fn [N, K];
                  int8: int8 [N, K]; int4: uint8 [N/2, K] (rows 2i / 2i+1 in the low / high nibble)
  weight_scale    nvfp4: float8_e4m3fn [N, K/16]; fp8: fp32 []; int8: fp32 [N]; int4: fp32 [N, K/128]
  weight_scale_2  nvfp4 only: fp32 []
  input_scale     fp32 [] where activations are quantized (fp8, int8, nvfp4)
  pre_quant_scale [K] where SmoothQuant (int8) / AWQ (int4) made one
and per attention layer `model.layers.{i}.self_attn.k_proj.k_scale` / `v_proj.v_scale` (fp32 []) = amax / 448 for
both FP8 and NVFP4 KV caches (our NVFP4 KV global scale is amax / (6 * 448), so it is x6 on disk).
q/k rows are in HF's half-split RoPE order on disk and interleaved in our `Transformer`.
Ours only: an NVFP4 KV cache's per-layer mean keys in `optiserve_kv_means.json` (see engine/kv_quant.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import ModelConfig, ModelLoadError, read_json
from .kv_quant import KV_BY_ALGO, KV_CACHE_FORMATS, KVFormat, kv_scale_from_modelopt
from .layout import LAYER_LINEARS, rope_row_perm
from .model import Transformer, with_layers
from .quant import QuantLinear
from .weight_formats import BY_QUANT_ALGO, FORMATS, PackedWeight, WeightFormat
from .weight_set import WeightSet
from .weights import load_model, read_state_dict

HF_QUANT_CONFIG = "hf_quant_config.json"
KV_MEANS_FILE = "optiserve_kv_means.json"  # beside an export with an NVFP4 KV cache; other runtimes ignore it


# ------------------------------------------------------------------------------------------------ detection ---
def read_hf_quant_config(model_dir: Path) -> dict | None:
    """The `quantization` section of a ModelOpt checkpoint (from hf_quant_config.json or config.json), else None."""
    path = Path(model_dir) / HF_QUANT_CONFIG
    if path.is_file():
        return read_json(path).get("quantization", {})
    cfg_path = Path(model_dir) / "config.json"
    if cfg_path.is_file():
        qc = read_json(cfg_path).get("quantization_config") or {}
        if qc.get("quant_method") == "modelopt":
            return {"quant_algo": qc.get("quant_algo"), "kv_cache_quant_algo": _kv_algo_of(qc.get("kv_cache_scheme")),
                    "group_size": _group_size_of(qc), "exclude_modules": qc.get("ignore", [])}
    return None


def _kv_algo_of(scheme) -> str | None:
    if isinstance(scheme, dict):  # convert_hf_quant_config_format writes FP8 as a compressed-tensors scheme
        return "FP8" if scheme.get("num_bits") == 8 and scheme.get("type") == "float" else None
    return scheme


def _group_size_of(qc: dict) -> int | None:
    for group in (qc.get("config_groups") or {}).values():
        if "group_size" in group.get("weights", {}):
            return group["weights"]["group_size"]
    return None


def is_modelopt_checkpoint(model_dir: Path) -> bool:
    return read_hf_quant_config(model_dir) is not None


def formats_of(quant: dict) -> tuple[str, str]:
    """(our weight format, our KV format) for a ModelOpt `quantization` section."""
    algo, kv_algo = quant.get("quant_algo"), quant.get("kv_cache_quant_algo")
    fmt, kv = BY_QUANT_ALGO.get(algo), KV_BY_ALGO.get(kv_algo)
    if (algo and fmt is None) or (kv_algo and kv is None):
        raise ModelLoadError(f"unsupported ModelOpt checkpoint: quant_algo {algo!r}, kv_cache_quant_algo {kv_algo!r} "
                             f"(supported: {', '.join(BY_QUANT_ALGO)}; KV {', '.join(KV_BY_ALGO)})")
    if fmt and fmt.group_size is not None and quant.get("group_size") not in (None, fmt.group_size):
        raise ModelLoadError(f"unsupported {algo} group_size {quant.get('group_size')} (need {fmt.group_size})")
    return fmt.name if fmt else "none", kv.name if kv else "none"


# ----------------------------------------------------------------------------------------------- loading ---
def read_kv_means(model_dir: Path, cfg: ModelConfig, device: str = "cpu") -> list[torch.Tensor] | None:
    """The per-layer mean keys [KV, D] (our RoPE layout) an optiserve export keeps beside the checkpoint, or None
    (a ModelOpt checkpoint has none: the NVFP4 cache then rotates keys without centring them)."""
    path = model_dir / KV_MEANS_FILE
    if not path.is_file():
        return None
    try:
        means = torch.tensor(read_json(path)["k_mean"], dtype=torch.float32)  # [L, KV, D], HF order
    except (KeyError, TypeError, ValueError) as e:
        raise ModelLoadError(f"{path}: no k_mean table ({e})") from None
    if means.shape != (cfg.num_layers, cfg.num_kv_heads, cfg.head_dim):
        raise ModelLoadError(f"{path}: k_mean has shape {tuple(means.shape)}, the model needs "
                             f"{(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim)}")
    ours = means[..., rope_row_perm(1, cfg.head_dim)]  # HF's half-split channels -> our interleaved pairs
    return [m.to(device) for m in ours]


def _load_kv_format(model_dir: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, kv_fmt: str,
                    device: str) -> KVFormat:
    """The checkpoint's KV-cache format: per-layer `k_scale`/`v_scale` (popped from `state`) and mean keys."""
    if kv_fmt == "none":
        return KVFormat()
    k_scales, v_scales = [], []
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}.self_attn."
        k = state.pop(p + "k_proj.k_scale", None)
        v = state.pop(p + "v_proj.v_scale", None)
        k = state.pop(p + "k_scale", None) if k is None else k  # vLLM-style names, also seen in the wild
        v = state.pop(p + "v_scale", None) if v is None else v
        if k is None or v is None:
            raise ModelLoadError(f"{model_dir}: KV cache is {kv_fmt} but layer {i} has no k_scale/v_scale")
        k_scales.append(kv_scale_from_modelopt(kv_fmt, k).to(device))
        v_scales.append(kv_scale_from_modelopt(kv_fmt, v).to(device))
    means = read_kv_means(model_dir, cfg, device) if KV_CACHE_FORMATS[kv_fmt].centres_keys else None
    return KVFormat(kv_fmt, k_scales, v_scales, means)


Packed = tuple[list[PackedWeight], torch.Tensor | None, torch.Tensor | None]  # shards, input_scale, pre_quant_scale


def _pop_packed_layers(model_dir: Path, state: dict[str, torch.Tensor], cfg: ModelConfig, fmt: WeightFormat,
                       dtype: torch.dtype, float_copies: bool) -> dict[str, Packed]:
    """Each quantized module's packed shards (q/k/v and gate/up re-fused, q/k rows interleaved), popped from
    `state`; `float_copies` leaves each projection's dequantized weight in `state` (HF layout) for `load_model`."""
    layers: dict[str, Packed] = {}
    for i in range(cfg.num_layers):
        for linear in LAYER_LINEARS:
            shards, input_scales, pqs = [], [], None
            for proj in linear.projections:
                key = f"{linear.hf_prefix(i)}{proj.name}."
                packed, input_scale = _pop_projection(model_dir, state, key, fmt, linear.in_features(cfg), dtype)
                if input_scale is not None:
                    input_scales.append(input_scale)
                if key + "pre_quant_scale" in state:
                    pqs = state.pop(key + "pre_quant_scale")
                if float_copies:
                    state[key + "weight"] = packed.dequantize(torch.float32)
                perm = proj.row_perm(cfg)
                shards.append(packed if perm is None else fmt.permute_rows(packed, perm))
            input_scale = torch.stack(input_scales).amax() if input_scales else None  # shared, as fused
            layers[linear.module_name(i)] = (shards, input_scale, pqs)
    return layers


def _pop_projection(model_dir: Path, state: dict[str, torch.Tensor], key: str, fmt: WeightFormat,
                    in_features: int, dtype: torch.dtype) -> tuple[PackedWeight, torch.Tensor | None]:
    """One HF projection's packed weight (HF row order) and input scale, popped from `state`."""
    try:
        t = {s: state.pop(key + s) for s in fmt.modelopt.tensors}
        input_scale = None
        if fmt.quantizes_activations:
            input_scale = state.pop(key + "input_scale").float().reshape(())
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}: weights lack {e.args[0]!r}") from None
    return fmt.modelopt.from_tensors(t, in_features, dtype), input_scale


def _quant_linears(base: Transformer, fmt: str, layers: dict[str, Packed], device: str) -> dict[str, QuantLinear]:
    """`QuantLinear`s on `device` in `base`'s dtype, each with the bias of the module it replaces in `base`."""
    dtype = base.embed.weight.dtype
    return {name: QuantLinear(fmt, [packed_to_device(s, device) for s in shards], base.get_submodule(name).bias,
                              _opt(input_scale, device),
                              None if pqs is None else pqs.to(device=device, dtype=torch.float32), dtype)
            for name, (shards, input_scale, pqs) in layers.items()}


def load_quantized_checkpoint(model_dir: Path, max_len: int, dtype: torch.dtype,
                              device: str = "cpu") -> WeightSet:
    """Build our `Transformer` from a ModelOpt unified HF checkpoint: unquantized tensors load as usual, each
    projection becomes a `QuantLinear` from its packed tensors."""
    fmt, kv_fmt = _checkpoint_formats(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    state = read_state_dict(model_dir)
    layers = _pop_packed_layers(model_dir, state, cfg, FORMATS[fmt], dtype, float_copies=True) if fmt != "none" else {}
    kv = _load_kv_format(model_dir, state, cfg, kv_fmt, device)
    model = load_model(model_dir, max_len, dtype, device, state=state)
    return WeightSet(with_layers(model, _quant_linears(model, fmt, layers, device)), fmt, kv)


def load_quantized_layers(model_dir: Path, base: Transformer) -> WeightSet:
    """A ModelOpt checkpoint exported from `base` (the same model unquantized), rebuilt on top of it: a copy of
    `base` whose linears are the checkpoint's, every other tensor shared with `base` (none read from disk)."""
    fmt, kv_fmt = _checkpoint_formats(model_dir)
    cfg, device = ModelConfig.from_dir(model_dir), str(base.embed.weight.device)
    if cfg != base.cfg:
        raise ModelLoadError(f"{model_dir}: its config.json is not the model's")
    state = read_state_dict(model_dir)
    dtype = base.embed.weight.dtype
    layers = _pop_packed_layers(model_dir, state, cfg, FORMATS[fmt], dtype, float_copies=False) if fmt != "none" else {}
    kv = _load_kv_format(model_dir, state, cfg, kv_fmt, device)
    return WeightSet(with_layers(base, _quant_linears(base, fmt, layers, device)), fmt, kv)


def _checkpoint_formats(model_dir: Path) -> tuple[str, str]:
    quant = read_hf_quant_config(model_dir)
    if quant is None:
        raise ModelLoadError(f"{model_dir}: not a ModelOpt checkpoint")
    return formats_of(quant)


def _opt(t: torch.Tensor | None, device: str) -> torch.Tensor | None:
    return None if t is None else t.to(device)


def packed_to_device(p: PackedWeight, device: str) -> PackedWeight:
    """`p` with its tensors on `device` (a CPU-quantized weight served on a GPU)."""
    if device == "cpu":
        return p
    fields = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(p).items()}
    return type(p)(**fields)
