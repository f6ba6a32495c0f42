"""The model card written beside a trained draft head."""

from __future__ import annotations

from pathlib import Path

UNKNOWN_LICENSE = "see the file's own license"
DATA_LICENSES = {
    "instructions.jsonl": "AlpacaEval instructions (tatsu-lab/alpaca_eval), data CC BY-NC 4.0; the answers trained on "
                          "are the target model's own greedy generations",
    "valid.txt": "WikiText-2 validation split, CC BY-SA 3.0; labels are the target model's greedy predictions",
}


def disk_budget(summary: dict) -> str:
    if "bytes_per_token" not in summary:
        return ""
    gb = summary["bytes_per_token"] * summary["train_tokens"] / 1e9
    return (f"\nFeature store (bf16 features, int32 tokens/labels): {summary['bytes_per_token']} bytes per token, "
            f"{gb:.1f} GB for the training tokens.")


def write_model_card(out: Path, summary: dict) -> None:
    """README.md beside the head: what it is, what data (and licenses) it was trained on, how to reproduce it."""
    data = "\n".join(f"- `{f}`: {DATA_LICENSES.get(Path(f).name, UNKNOWN_LICENSE)}" for f in summary["data"])
    cfg = summary["config"]
    (out / "README.md").write_text(f"""# EAGLE-3-style draft head for {summary["model"]}

One decoder layer over the target's layer outputs {summary.get("target_layers", "")} (fused by a linear layer) and
the embedding of the last token; predicts a reduced vocabulary of {cfg["draft_vocab_size"]} tokens (`d2t` maps them
to target ids). Stored in bf16. Serve with `optiserve serve --model default --speculative auto` (or pass this dir).

## Training data
{data}

Trained tokens: {summary["train_tokens"]} ({summary["train_labelled_tokens"]} with a label), training-time test depth
{cfg["ttt_steps"]}, {summary["steps"]} steps of {cfg["rows_per_step"]} x {cfg["row_len"]} tokens, {summary["minutes"]}
minutes on the machine that trained it.{disk_budget(summary)}

## Held-out results ({summary["heldout_sequences"]} answers not trained on)
- top-1 agreement with the target at draft steps 1..{cfg["ttt_steps"]}: {summary["heldout_step_accuracy"]}
- draft-vocabulary coverage of the target's tokens: {summary["heldout_draft_vocab_coverage"]}
- τ expected for a {cfg["draft_len"]}-token chain: {summary[f"heldout_expected_tau_chain{cfg['draft_len']}"]}
  (measured τ and speed: `optiserve bench spec`, see the project README)

## Reproduce
`optiserve train-draft --model {summary["model"]} --data {" ".join(summary["data"])} --output DIR`
(with `--max-prompts {cfg["max_prompts"]} --epochs {cfg["epochs"]} --text-tokens {cfg["text_tokens"]}`)
""")
