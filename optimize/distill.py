"""Knowledge distillation from a teacher: the loss QAD and `optiserve distill` share, and the distill command.

Loss = KL(teacher || student) of next-token distributions, teacher logits computed on the fly,
+ `data_weight` * next-token cross entropy on the data, + `hidden_weight` * a normalised MSE between student and
teacher layer outputs (needs the same hidden size: depth-pruned or quantized students).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from optiserve.engine.model import Transformer

from .train import (
    EVAL_WINDOW,
    LossFn,
    TrainConfig,
    causal_inputs,
    data_loss,
    init_distributed,
    kl_loss,
    main_first,
    report,
    sync_tied_head,
    train,
    train_logits,
)

PRUNE_INFO_KEY = "optiserve_pruned_from"  # config.json entry `optiserve prune` writes: kept teacher layers
HIDDEN_POINTS = 3  # student layers matched to teacher layers for the intermediate-state loss


@dataclass
class DistillLoss:
    data_weight: float = 0.0
    hidden_weight: float = 0.0
    layer_map: tuple[tuple[int, int], ...] = ()  # (student layer, teacher layer) pairs for the hidden loss

    def __post_init__(self) -> None:
        if self.data_weight < 0 or self.hidden_weight < 0:
            raise ValueError("loss weights must be >= 0")


def layer_map(student: Transformer, teacher: Transformer, kept: list[int] | None) -> tuple[tuple[int, int], ...]:
    """HIDDEN_POINTS student layers, evenly spaced and ending at the last, each with its teacher layer: the one it
    was pruned from (`kept`) or the proportional one."""
    if student.cfg.hidden_size != teacher.cfg.hidden_size:
        raise ValueError("the intermediate-state loss needs student and teacher of the same hidden size")
    ls, lt = student.cfg.num_layers, teacher.cfg.num_layers
    points = sorted({round((k + 1) * ls / HIDDEN_POINTS) - 1 for k in range(HIDDEN_POINTS)})
    return tuple((s, kept[s] if kept else round((s + 1) * lt / ls) - 1) for s in points)


def with_layer_map(cfg: DistillLoss, student: Transformer, teacher: Transformer,
                   kept: list[int] | None = None) -> DistillLoss:
    """`cfg` with its layer map filled in when the intermediate-state loss is on."""
    if not cfg.hidden_weight or cfg.layer_map:
        return cfg
    return DistillLoss(cfg.data_weight, cfg.hidden_weight, layer_map(student, teacher, kept))


def distill_loss_fn(student: Transformer, teacher: Transformer, cfg: DistillLoss) -> LossFn:
    """The training loss over a batch of tokens [B, S]; returns (loss, parts for the progress bar)."""
    s_layers = tuple(s for s, _ in cfg.layer_map) if cfg.hidden_weight else ()
    t_layers = tuple(t for _, t in cfg.layer_map) if cfg.hidden_weight else ()

    def loss_fn(tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        positions, mask = causal_inputs(tokens, teacher)
        with torch.no_grad():
            xt, t_states = teacher.hidden_states(tokens, positions, None, mask, capture=t_layers)
            t_logits = teacher.logits(xt)  # [B, S, V]
        _, s_mask = causal_inputs(tokens, student)
        xs, s_states = student.hidden_states(tokens, positions, None, s_mask, capture=s_layers)
        logits = train_logits(student, xs)
        kl = kl_loss(logits, t_logits)
        loss, parts = kl, {"kl": kl.item()}
        if cfg.data_weight:
            ce = data_loss(logits, tokens)
            loss, parts["ce"] = loss + cfg.data_weight * ce, ce.item()
        if cfg.hidden_weight:
            # normalised by the teacher state's mean square: layers differ in scale by orders of magnitude
            mse = sum(F.mse_loss(s, t) / t.pow(2).mean() for s, t in zip(s_states, t_states, strict=True))
            loss, parts["hidden"] = loss + cfg.hidden_weight * mse, float(mse)
        return loss, parts

    return loss_fn


def pruned_layers(model_dir: Path) -> list[int] | None:
    """The teacher layers a pruned checkpoint kept (None if it was not pruned by depth)."""
    info = json.loads((model_dir / "config.json").read_text()).get(PRUNE_INFO_KEY) or {}
    return info.get("kept_layers")


def run_distill(model: str, teacher_model: str, data: list[str], output: str, train_cfg: TrainConfig,
                loss_cfg: DistillLoss, eval_data: str | None = None, eval_windows: int = 40,
                json_path: str | None = None) -> dict | None:
    """Distil `teacher_model` into the (pruned) checkpoint `model`; writes a plain HF checkpoint to `output`."""
    from transformers import AutoTokenizer

    from optiserve.engine.weight_set import WeightSet
    from optiserve.engine.weights import load_model, resolve_model_dir

    from .data import training_windows
    from .export import export_checkpoint

    d = init_distributed()
    student_dir, teacher_dir = resolve_model_dir(model), main_first(d, lambda: resolve_model_dir(teacher_model))
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    windows = training_windows(tokenizer, data, train_cfg.seq_len)
    max_len = max(train_cfg.seq_len, EVAL_WINDOW)
    teacher = load_model(teacher_dir, max_len, torch.float32)
    student = load_model(student_dir, max_len, torch.float32)
    if student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise ValueError("student and teacher must share the vocabulary")
    loss_cfg = with_layer_map(loss_cfg, student, teacher, pruned_layers(student_dir))
    params = {n: p for n, p in student.named_parameters() if not n.startswith("lm_head.")
              or not student.cfg.tie_word_embeddings}
    for p in params.values():
        p.requires_grad_(True)
    summary = train(params, distill_loss_fn(student, teacher, loss_cfg), windows, train_cfg, Path(output), d,
                    "distill")
    if not d.main:
        return None
    sync_tied_head(student)
    student.requires_grad_(False)
    out = export_checkpoint(student_dir, WeightSet(student), Path(output))
    extra = {"command": "distill", "model": model, "teacher": teacher_model, "output": str(out),
             "loss": asdict(loss_cfg)}
    return report(summary, extra, teacher, eval_data, eval_windows, tokenizer, json_path)
