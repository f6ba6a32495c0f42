"""Max calibration: run calibration windows through the model and record what PTQ needs per linear layer.

Per `Linear` (except the LM head): the input's per-tensor amax, its per-channel amax (SmoothQuant) and mean |x|
(AWQ), plus a seeded sample of input rows (64 per window, 2048 at most) for AWQ's searches. Per layer: the amax
of K and of V as written to the cache, and the mean key (the NVFP4 KV cache centres keys on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from optiserve.engine.config import read_json
from optiserve.engine.model import Linear, Transformer, with_layers
from optiserve.engine.runner import ModelRunner
from optiserve.engine.weights import read_safetensors

SAMPLE_ROWS = 2048  # input rows kept per linear for the AWQ searches (fewer rows made noisier, worse choices)
SAMPLE_ROWS_PER_WINDOW = 64  # taken from each calibration window, so all 32 default windows contribute
SAMPLE_DTYPE = torch.float16  # halves the sample's memory and cache file (~400 MB on the default model)
SAMPLE_SEED = 0  # the rows are drawn at random but reproducibly: the same calibration gives the same AWQ search


@dataclass
class InputStats:
    amax: torch.Tensor  # [] per-tensor abs max
    channel_amax: torch.Tensor  # [in]
    channel_abs_sum: torch.Tensor  # [in]
    rows: int = 0
    sample: list[torch.Tensor] = field(default_factory=list)

    @property
    def channel_mean(self) -> torch.Tensor:
        return self.channel_abs_sum / max(self.rows, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.sample)[:SAMPLE_ROWS].float()  # [R, in]


@dataclass
class CalibStats:
    linears: dict[str, InputStats]  # module name -> stats of its input
    k_amax: list[torch.Tensor]  # per layer
    v_amax: list[torch.Tensor]
    k_mean: list[torch.Tensor]  # per layer [KV, D]: the mean key as written to the cache (after RoPE)


def quantizable_linears(model: Transformer) -> dict[str, Linear]:
    """Every linear layer PTQ touches: all but the LM head (and embeddings, which are not linears)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, Linear) and n != "lm_head"}


def _record_input(stats: dict[str, InputStats], name: str):
    rows_rng = torch.Generator().manual_seed(SAMPLE_SEED)

    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [rows, in]
        s = stats.get(name)
        if s is None:
            zeros = torch.zeros(x.shape[-1], device=x.device)
            s = stats[name] = InputStats(torch.zeros((), device=x.device), zeros.clone(), zeros.clone())
        s.amax = torch.maximum(s.amax, x.abs().amax())
        s.channel_amax = torch.maximum(s.channel_amax, x.abs().amax(0))
        s.channel_abs_sum += x.abs().sum(0)
        s.rows += x.shape[0]
        if sum(len(t) for t in s.sample) < SAMPLE_ROWS:  # spread the sample over windows: a few rows each
            picked = torch.randperm(x.shape[0], generator=rows_rng)[:SAMPLE_ROWS_PER_WINDOW]
            rows = x[picked]  # fp32 where fp16 would overflow (torch.cat promotes the mix back to fp32)
            s.sample.append(rows.to(SAMPLE_DTYPE) if rows.abs().max() < torch.finfo(SAMPLE_DTYPE).max else rows)

    return hook


@torch.inference_mode()
def calibrate(model: Transformer, windows: list[list[int]], progress: bool = True) -> CalibStats:
    """Run `windows` through `model` and collect `CalibStats` (the model is left unchanged).

    The hooks sit on a private copy of the modules (sharing the weight tensors, which nothing writes): `model` may
    be the one an engine is serving, and its requests' activations must not enter the statistics."""
    model = with_layers(model, {})
    n_layers, device = model.cfg.num_layers, model.embed.weight.device
    stats: dict[str, InputStats] = {}
    k_amax = [torch.zeros((), device=device) for _ in range(n_layers)]
    v_amax = [torch.zeros((), device=device) for _ in range(n_layers)]
    k_sum = [torch.zeros(model.cfg.num_kv_heads, model.cfg.head_dim, dtype=torch.float64, device=device)
             for _ in range(n_layers)]
    handles = [m.register_forward_pre_hook(_record_input(stats, n)) for n, m in quantizable_linears(model).items()]
    runner = ModelRunner(model, 1, max(len(w) for w in windows), model.embed.weight.dtype)
    cache_update = runner.cache.update

    def recording_update(layer, positions, k, v):
        k_amax[layer] = torch.maximum(k_amax[layer], k.abs().amax().float())
        v_amax[layer] = torch.maximum(v_amax[layer], v.abs().amax().float())
        k_sum[layer] += k.sum((0, 1)).double()  # k [B, S, KV, D]
        return cache_update(layer, positions, k, v)

    runner.cache.update = recording_update
    try:
        for ids in tqdm(windows, desc="calibrate", unit="window", disable=not progress):
            runner.prefill(0, ids)
    finally:
        for h in handles:
            h.remove()
    tokens = sum(len(w) for w in windows)
    return CalibStats(stats, k_amax, v_amax, [(s / tokens).float() for s in k_sum])


STATS_TENSORS, STATS_JSON = "stats.safetensors", "stats.json"  # a cached `CalibStats`: tensors, and row counts


def save_stats(stats: CalibStats, out_dir: Path) -> None:
    """Write `stats` as safetensors (every tensor, each sample chunk in its own dtype) + JSON (row counts)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for name, s in stats.linears.items():
        tensors |= {f"{name}.amax": s.amax, f"{name}.channel_amax": s.channel_amax,
                    f"{name}.channel_abs_sum": s.channel_abs_sum}
        tensors |= {f"{name}.sample.{j}": t for j, t in enumerate(s.sample)}
    for per_layer in ("k_amax", "v_amax", "k_mean"):
        tensors |= {f"{per_layer}.{i}": t for i, t in enumerate(getattr(stats, per_layer))}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(out_dir / STATS_TENSORS))
    meta = {"layers": len(stats.k_amax),
            "linears": {name: {"rows": s.rows, "sample_chunks": len(s.sample)} for name, s in stats.linears.items()}}
    (out_dir / STATS_JSON).write_text(json.dumps(meta))


def load_stats(in_dir: Path, device: torch.device | str) -> CalibStats:
    """The `CalibStats` `save_stats` wrote (ModelLoadError naming the file, or KeyError, if it is damaged)."""
    meta = read_json(in_dir / STATS_JSON)
    t = {k: v.to(device) for k, v in read_safetensors(in_dir / STATS_TENSORS).items()}
    linears = {name: InputStats(t[f"{name}.amax"], t[f"{name}.channel_amax"], t[f"{name}.channel_abs_sum"],
                                int(m["rows"]), [t[f"{name}.sample.{j}"] for j in range(m["sample_chunks"])])
               for name, m in meta["linears"].items()}
    per_layer = {k: [t[f"{k}.{i}"] for i in range(meta["layers"])] for k in ("k_amax", "v_amax", "k_mean")}
    return CalibStats(linears, **per_layer)
