"""Quality of a (quantized, pruned, ...) model against the unquantized one: perplexity, KL, top-1 agreement."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from optiserve.engine.kv_quant import KVFormat
from optiserve.engine.model import Transformer
from optiserve.engine.runner import ModelRunner


@dataclass
class EvalResult:
    perplexity: float
    reference_perplexity: float | None
    kl_divergence: float | None  # mean KL(reference || model) per next-token distribution
    top1_agreement: float | None  # fraction of positions where both argmaxes agree
    windows: int
    tokens: int


def window_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """Logits [S, V] of one window, all positions, from a fresh pass through slot 0."""
    return runner.prefill(0, ids, all_logits=True)


@dataclass
class QualityTotals:
    """Running sums over windows of next-token NLL, KL(reference || model) and top-1 agreement.

    One accumulation for every evaluation (our engine's models here, ModelOpt's HF models in `modelopt_compare`).
    """

    nll: float = 0.0
    ref_nll: float = 0.0
    kl: float = 0.0
    agree: float = 0.0
    tokens: int = 0
    windows: int = 0
    has_ref: bool = False

    def add(self, ids: list[int], logits: torch.Tensor, ref_logits: torch.Tensor | None = None) -> None:
        """Add one window: `logits` (and `ref_logits`) [S, V] for all positions of `ids`."""
        targets = torch.tensor(ids[1:], device=logits.device)
        logp = F.log_softmax(logits[:-1], dim=-1)  # [S-1, V]
        self.nll += F.nll_loss(logp, targets, reduction="sum").item()
        self.tokens += len(targets)
        self.windows += 1
        if ref_logits is not None:
            self.has_ref = True
            ref_logp = F.log_softmax(ref_logits[:-1], dim=-1)
            self.ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
            self.kl += F.kl_div(logp, ref_logp, log_target=True, reduction="sum").item()
            self.agree += (logp.argmax(-1) == ref_logp.argmax(-1)).sum().item()

    def result(self) -> EvalResult:
        n, ref = self.tokens, self.has_ref
        return EvalResult(
            perplexity=math.exp(self.nll / n),
            reference_perplexity=math.exp(self.ref_nll / n) if ref else None,
            kl_divergence=self.kl / n if ref else None,
            top1_agreement=self.agree / n if ref else None,
            windows=self.windows,
            tokens=n,
        )


def evaluate(
    model: Transformer, windows: list[list[int]], reference: Transformer | None = None, progress: bool = True,
    kv: KVFormat | None = None,
) -> EvalResult:
    """Perplexity of `model` over `windows`; with a `reference`, also its perplexity, mean KL and top-1 agreement.

    `kv` quantizes the evaluated model's KV cache (the reference's stays unquantized).
    """
    window = max(len(w) for w in windows)
    dtype = model.embed.weight.dtype
    runner = ModelRunner(model, 1, window, dtype)
    runner.cache.set_format(kv or KVFormat())
    ref_runner = ModelRunner(reference, 1, window, dtype) if reference is not None else None
    totals = QualityTotals()
    for ids in tqdm(windows, desc="eval", unit="window", disable=not progress):
        ref_logits = window_logits(ref_runner, ids) if ref_runner is not None else None
        totals.add(ids, window_logits(runner, ids), ref_logits)
    return totals.result()


def write_result(result: EvalResult, extra: dict, json_path: str | None) -> dict:
    """Print a one-line summary and write the JSON report."""
    out = {**extra, **asdict(result)}
    line = f"perplexity {result.perplexity:.3f}"
    if result.reference_perplexity is not None:
        line += (f" (unquantized {result.reference_perplexity:.3f}), KL {result.kl_divergence:.4f}, "
                 f"top-1 agreement {result.top1_agreement:.3f}")
    print(f"{line} over {result.windows} windows / {result.tokens} tokens")
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=2))
    return out


def evaluate_checkpoint(model_dir: Path, windows: list[list[int]], reference: Transformer | None = None,
                        progress: bool = True, device: str = "cpu") -> EvalResult:
    """`evaluate` a checkpoint dir as the server would load it on `device`: a ModelOpt one with its `QuantLinear`s
    and KV format, a plain HF one as is."""
    from optiserve.engine.quantized_checkpoint import is_modelopt_checkpoint, load_quantized_checkpoint
    from optiserve.engine.weights import load_model

    window = max(len(w) for w in windows)
    if is_modelopt_checkpoint(model_dir):
        q = load_quantized_checkpoint(model_dir, window, torch.float32, device)
        return evaluate(q.model, windows, reference, progress, kv=q.kv)
    return evaluate(load_model(model_dir, window, torch.float32, device), windows, reference, progress)
