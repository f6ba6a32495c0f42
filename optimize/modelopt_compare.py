"""NVIDIA ModelOpt's column of `optiserve eval --compare-modelopt`: the same eval and calibration windows,
quantized by ModelOpt itself, scored with the same math (`evaluate.QualityTotals`).

- fp8 / int8 / int4: `mtq.quantize` with `FP8_DEFAULT_CFG` / `INT8_SMOOTHQUANT_CFG` / `INT4_AWQ_CFG` (these
  fake-quantize on the CPU), calibrated by a forward loop over the calibration windows.
- nvfp4-w4a16: every linear's weight (not the LM head) replaced by `NVFP4QTensor.quantize(w, 16)` dequantized;
  nvfp4 (W4A4) also fake-quantizes each linear's input with a global scale from max calibration of that input
  (amax / (6 * 448), ModelOpt's `weights_scaling_factor_2`). `NVFP4_DEFAULT_CFG` asserts CUDA, hence its math.
- none: ModelOpt's column is the unquantized HF model.

Importing modelopt registers plugins and patches libraries, so ModelOpt runs in a subprocess
(`python -m optiserve.optimize.modelopt_compare SPEC.json OUT.json`); only `compare_with_modelopt` and
`print_comparison` are called from the `optiserve` process, and they never import it.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from optiserve.kernels.formats import NVFP4_BLOCK_SIZE, NVFP4_GLOBAL_DIVISOR

from .evaluate import EvalResult, QualityTotals
from .ptq_pipeline import QuantRequest, calibration_windows

MTQ_CONFIGS = {"fp8": "FP8_DEFAULT_CFG", "int8": "INT8_SMOOTHQUANT_CFG", "int4": "INT4_AWQ_CFG"}
METHODS = {"none": "unquantized", **MTQ_CONFIGS, "nvfp4": "NVFP4QTensor W4A4", "nvfp4-w4a16": "NVFP4QTensor W4A16"}
EXIT_NO_MODELOPT = 3


# ------------------------------------------------------------------------------- the optiserve process's side ---
def require_modelopt(fmt: str, checkpoint: bool = False, dtype: str = "float32") -> None:
    """ValueError unless ModelOpt is installed and can quantize the unquantized float32 model in format `fmt`."""
    if checkpoint or dtype != "float32":
        raise ValueError("--compare-modelopt quantizes the unquantized model in float32: not a checkpoint dir, "
                         "--reference or --dtype bfloat16")
    if fmt not in METHODS:
        raise ValueError(f"--compare-modelopt has no ModelOpt counterpart for {fmt!r}")
    if importlib.util.find_spec("modelopt") is None:
        raise ValueError("--compare-modelopt needs NVIDIA ModelOpt: pip install nvidia-modelopt")


def compare_with_modelopt(model_dir: Path, tokenizer, req: QuantRequest, windows: list[list[int]]) -> dict | None:
    """ModelOpt's `req.quant` model on `windows`, calibrated on the windows our PTQ uses for `req`, run in a
    subprocess: its EvalResult fields plus `method`, `modelopt_version` and `quantized_linears`. None with a KV-cache
    format (ModelOpt's KV-cache quantization is not run here). ValueError when ModelOpt is missing or fails."""
    require_modelopt(req.quant)
    if req.kv_cache != "none":
        return None
    with tempfile.TemporaryDirectory(prefix="optiserve-modelopt-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"model_dir": str(model_dir), "format": req.quant, "windows": windows,
                                    "calib_windows": calibration_windows(tokenizer, req)}))
        proc = subprocess.run([sys.executable, "-m", __name__, str(job), str(out)])
        if proc.returncode == EXIT_NO_MODELOPT:
            raise ValueError("--compare-modelopt: modelopt is installed but cannot be imported (see above)")
        if proc.returncode != 0:
            raise ValueError(f"the ModelOpt run failed (exit {proc.returncode}); its output is above")
        return json.loads(out.read_text())


def print_comparison(fmt: str, ours: EvalResult, theirs: dict | None) -> None:
    """Two columns, ours vs ModelOpt: perplexity, Δ vs unquantized, KL, top-1 agreement."""
    rows = [("perplexity", "perplexity", "{:.3f}"), ("unquantized perplexity", "reference_perplexity", "{:.3f}"),
            ("Δ vs unquantized", None, "{:+.1%}"), ("KL", "kl_divergence", "{:.4f}"),
            ("top-1 agreement", "top1_agreement", "{:.3f}")]

    def cell(res: dict | None, key: str | None, pattern: str) -> str:
        if res is None or (key is None and res["reference_perplexity"] is None):
            return "n/a"
        value = res["perplexity"] / res["reference_perplexity"] - 1 if key is None else res[key]
        return "n/a" if value is None else pattern.format(value)

    head = f"ModelOpt {theirs['modelopt_version']}" if theirs else "ModelOpt"
    print(f"\n{'':24}{'optiserve':>14}{head:>24}")
    print(f"{'format':24}{fmt:>14}{(theirs or {}).get('method', 'not run (KV cache)'):>24}")
    for label, key, pattern in rows:
        print(f"{label:24}{cell(asdict(ours), key, pattern):>14}{cell(theirs, key, pattern):>24}")


# -------------------------------------------------------------------------------- the ModelOpt subprocess's side ---
def load_hf(model_dir: str) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def target_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linears PTQ quantizes: all but the LM head."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and not n.endswith("lm_head")}


@torch.no_grad()  # not inference_mode: ModelOpt's calibrators keep tensors they later update in place
def hf_logits(model: nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits [S, V] of one window, all positions."""
    return model(torch.tensor([ids])).logits[0]


def run_windows(model: nn.Module, windows: list[list[int]], desc: str) -> None:
    for ids in tqdm(windows, desc=desc, unit="window"):
        hf_logits(model, ids)


def quantize_mtq(model: nn.Module, fmt: str, calib_windows: list[list[int]]) -> int:
    """`mtq.quantize` with the format's preset config; the number of linears with an enabled weight quantizer."""
    import modelopt.torch.quantization as mtq

    mtq.quantize(model, getattr(mtq, MTQ_CONFIGS[fmt]), lambda m: run_windows(m, calib_windows, "calibrate"))
    return sum(1 for m in target_linears(model).values()
               if getattr(m, "weight_quantizer", None) is not None and m.weight_quantizer.is_enabled)


def nvfp4_fake_quant(x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
    """ModelOpt's NVFP4 quantize then dequantize (block 16, FP8 block scales, FP32 global scale: from `x` when
    not given, as for weights)."""
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    q, scale, scale_2 = NVFP4QTensor.quantize(x, NVFP4_BLOCK_SIZE, weights_scaling_factor_2=global_scale)
    return q.dequantize(dtype=x.dtype, scale=scale, double_scale=scale_2, block_sizes={-1: NVFP4_BLOCK_SIZE})


def input_amax(model: nn.Module, calib_windows: list[list[int]]) -> dict[str, torch.Tensor]:
    """Max calibration: each target linear's input abs max over the calibration windows (unquantized model)."""
    amax: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args):
            a = args[0].detach().abs().amax().float()
            amax[name] = torch.maximum(amax.get(name, a), a)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in target_linears(model).items()]
    try:
        run_windows(model, calib_windows, "calibrate")
    finally:
        for h in handles:
            h.remove()
    return amax


def quantize_nvfp4(model: nn.Module, fmt: str, calib_windows: list[list[int]]) -> int:
    """NVFP4 weights; for W4A4 also inputs, with the calibrated global scale; the number of linears quantized."""
    linears = target_linears(model)
    amax = input_amax(model, calib_windows) if fmt == "nvfp4" else {}
    for name, linear in linears.items():
        with torch.no_grad():
            linear.weight.copy_(nvfp4_fake_quant(linear.weight.data))
        if fmt == "nvfp4":
            global_scale = (amax[name] / NVFP4_GLOBAL_DIVISOR).clamp_min(torch.finfo(torch.float32).tiny)
            linear.register_forward_pre_hook(lambda m, args, s=global_scale: (nvfp4_fake_quant(args[0], s),))
    return len(linears)


def modelopt_result(model_dir: str, fmt: str, windows: list[list[int]], calib_windows: list[list[int]]) -> dict:
    """ModelOpt's `fmt` model scored against the unquantized HF model on `windows`."""
    import modelopt

    reference, model = load_hf(model_dir), load_hf(model_dir)
    if fmt in MTQ_CONFIGS:
        quantized = quantize_mtq(model, fmt, calib_windows)
    elif fmt in ("nvfp4", "nvfp4-w4a16"):
        quantized = quantize_nvfp4(model, fmt, calib_windows)
    else:
        quantized = 0
    totals = QualityTotals()
    for ids in tqdm(windows, desc="eval (ModelOpt)", unit="window"):
        totals.add(ids, hf_logits(model, ids), hf_logits(reference, ids))
    return {"method": METHODS[fmt], "modelopt_version": modelopt.__version__, "quantized_linears": quantized,
            **asdict(totals.result())}


def main(argv: list[str] | None = None) -> None:
    job_path, out_path = argv if argv is not None else sys.argv[1:]
    job = json.loads(Path(job_path).read_text())
    try:
        import modelopt.torch.quantization  # noqa: F401  (registers ModelOpt's plugins before any model loads)
    except ImportError as e:
        print(f"optiserve: error: cannot import modelopt: {e}", file=sys.stderr)
        sys.exit(EXIT_NO_MODELOPT)
    torch.manual_seed(0)
    result = modelopt_result(job["model_dir"], job["format"], job["windows"], job["calib_windows"])
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
