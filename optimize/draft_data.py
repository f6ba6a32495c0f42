"""Training data for a draft head: the target's own tokens and hidden states.

A draft head must predict what the *target* would say, so its labels are the target's greedy tokens:
- chat answers the target generates itself (batched, with our engine), resumable in a jsonl file;
- any other text labelled in one prefill: each position's label is the target's argmax there, no generation needed.
Features are the outputs of three target layers (low, middle, high), kept in bf16 to halve memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from optiserve.engine.model import Transformer
from optiserve.engine.runner import attention_mask

GENERATE_BATCH = 16


@dataclass
class DraftSample:
    """One training sequence: `tokens` [T] the target read, `labels` [T] its greedy next token at each position
    (-100 where there is nothing to learn, e.g. inside a prompt), `features` [T, 3H] from the captured layers,
    and optionally the target's K most likely next tokens `top_ids` [T, K] with their probabilities `top_probs`
    [T, K] (0 where there is no label): the teacher's distribution, more than its argmax to learn from."""

    tokens: torch.Tensor
    labels: torch.Tensor
    features: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None

    def head(self, n: int) -> DraftSample:
        """The first `n` positions."""
        cut = [None if t is None else t[:n] for t in (self.top_ids, self.top_probs)]
        return DraftSample(self.tokens[:n], self.labels[:n], self.features[:n], *cut)


def generate_answers(engine, prompts: list[list[int]], max_tokens: int, out_path: Path) -> list[dict]:
    """Greedy answers of the target to `prompts`, appended to `out_path` as jsonl (a rerun resumes)."""
    from optiserve.engine.config import SamplingParams
    from optiserve.engine.llm_engine import run_to_completion

    done = [json.loads(line) for line in out_path.read_text().splitlines()] if out_path.is_file() else []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    bar = tqdm(total=len(prompts), initial=len(done), desc="generating answers", unit="prompt")
    with out_path.open("a") as f:
        for start in range(len(done), len(prompts), GENERATE_BATCH):
            batch = prompts[start : start + GENERATE_BATCH]
            for prompt, answer in zip(batch, run_to_completion(engine, batch, params), strict=True):
                row = {"prompt_ids": prompt, "answer_ids": answer}
                f.write(json.dumps(row) + "\n")
                done.append(row)
            f.flush()
            bar.update(len(batch))
    bar.close()
    return done


@torch.inference_mode()
def label_sequence(target: Transformer, tokens: list[int], layers: tuple[int, ...], learn_from: int,
                   own_tokens: bool, top_k: int = 0) -> DraftSample:
    """Run the target over `tokens` once: its greedy next token at each position and the captured features.

    Positions before `learn_from` (a chat prompt) get no label. For the target's own greedy answers
    (`own_tokens`) the label is simply the next token, and the layers above the highest captured one are skipped
    unless `top_k` asks for the target's `top_k` most likely next tokens too; for other text the labels are what
    the target would have said there."""
    ids = torch.tensor([tokens])  # [1, T]
    positions = torch.arange(len(tokens)).unsqueeze(0)
    mask = attention_mask(positions, len(tokens), target.cfg.group_size, target.cfg.sliding_window)
    through = max(layers) + 1 if own_tokens and not top_k else None
    x, captured = target.hidden_states(ids, positions, None, mask, capture=layers, num_layers=through)
    logits = None if through else target.logits(x[0])  # [T, V]
    own = torch.cat([ids[0, 1:], torch.tensor([-100])])
    labels = own if own_tokens else logits.argmax(-1)  # [T]
    labels[:learn_from] = -100
    features = torch.cat(captured, dim=-1)[0].to(torch.bfloat16)  # [T, 3H]
    if not top_k:
        return DraftSample(ids[0], labels, features)
    probs, top = logits.softmax(-1).topk(top_k, dim=-1)  # [T, K]
    probs[labels < 0] = 0
    return DraftSample(ids[0], labels, features, top.to(torch.int32), probs.to(torch.float16))


def label_all(target: Transformer, sequences: list[tuple[list[int], int]], layers: tuple[int, ...]
              ) -> list[DraftSample]:
    """`label_sequence` over (tokens, learn_from) pairs (learn_from > 0: a prompt and the target's own answer)."""
    return [label_sequence(target, t, layers, s, own_tokens=s > 0)
            for t, s in tqdm(sequences, desc="labelling", unit="seq")]


def text_chunks(tokenizer, text: str, chunk: int) -> list[tuple[list[int], int]]:
    """Plain text cut into `chunk`-token pieces, each fully labelled by the target (learn_from 0)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    return [(ids[i : i + chunk], 0) for i in range(0, len(ids) - chunk + 1, chunk)]
