"""Train/serve parity of the draft head: the serving drafter, teacher-forced, predicts what training scores.

`EagleDrafter.propose` (serving) and `ttt_states` (training) must feed the head the same inputs at every draft
step: the same token embeddings, hidden states, positions and visible keys. On held-out text (a chat prompt and
the target's own answer), the drafter is run at every prefix as in serving — prefill, then one verified position
at a time — with its picks forced to the true next tokens, and its argmax at each chain step must equal the
training-time test's argmax at that position and step. Both read the same (bf16-stored) target features; serving
holds the head's linears as bf16 (the values it was saved with) for the packed kernel; a disagreement is tolerated
only at a near-tie of the training logits (fp32 kernels vs masked SDPA round apart).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from optiserve.engine.block_manager import BlockPool
from optiserve.engine.config import SamplingParams
from optiserve.engine.kv_cache import SlotTables
from optiserve.engine.llm_engine import run_to_completion
from optiserve.engine.model import Linear
from optiserve.engine.spec.decoder import shipped_head_dir
from optiserve.engine.spec.draft_head import load_draft_head, with_serving_linears
from optiserve.engine.spec.drafters import EagleDrafter
from optiserve.optimize.draft_data import label_sequence
from optiserve.optimize.draft_ttt import PackedBatch, ttt_states

STEPS = 4
ANSWER_TOKENS = 48
TIE_GAP = 1e-3


@pytest.fixture(scope="module")
def head(engine):
    return load_draft_head(shipped_head_dir()).attach(engine.runner.model)


@pytest.fixture(scope="module")
def held_out(engine, chat_prompt_ids) -> list[int]:
    prompt = chat_prompt_ids[3]
    answer = run_to_completion(engine, [prompt], SamplingParams(max_tokens=ANSWER_TOKENS, temperature=0.0))[0]
    return prompt + answer


def training_predictions(head, target, tokens: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per step k: argmax [T] and top-2 gap [T] of the training-time test over `tokens`; and the features."""
    sample = label_sequence(target, tokens, head.cfg.target_layers, 0, own_tokens=False)
    T = len(tokens)
    batch = PackedBatch(sample.tokens[None], sample.labels[None], sample.features[None],
                        torch.zeros(1, T, dtype=torch.long), torch.arange(T)[None])
    argmax, gaps = [], []
    with torch.inference_mode():
        for hidden in ttt_states(head, batch, STEPS):
            top = head.logits(hidden[0]).topk(2, dim=-1).values  # [T, 2]
            argmax.append(head.logits(hidden[0]).argmax(-1))
            gaps.append(top[:, 0] - top[:, 1])
    return argmax, gaps, sample.features


def serving_predictions(drafter: EagleDrafter, tokens: list[int], features: torch.Tensor, first: int
                        ) -> dict[tuple[int, int], int]:
    """(t, k) -> the drafter's argmax at chain step k after prefix t (features 0..t, tokens 0..t+1), its picks
    forced to the true tokens; steps after a true token outside the draft vocabulary are not scored."""
    d2t = drafter.head.d2t
    t2d = torch.full((drafter.head.cfg.target_vocab_size,), -1, dtype=torch.long)
    t2d[d2t] = torch.arange(len(d2t))
    seq = SimpleNamespace(token_ids=tokens[: first + 2], draft_state=None, slot=0)
    drafter.on_prefill(seq, features[: first + 1])
    got: dict[tuple[int, int], int] = {}
    for t in range(first, len(tokens) - 1 - STEPS):
        if t > first:  # serving's order: the target verified one more position
            seq.token_ids = tokens[: t + 2]
            drafter.on_verify(seq, features[t : t + 1])
        forced = [int(t2d[tok]) for tok in tokens[t + 2 : t + 2 + STEPS]]
        step = iter(range(STEPS))

        def force(logits: torch.Tensor, seqs, t=t, forced=forced, step=step):
            k = next(step)
            if all(d >= 0 for d in forced[:k]):
                got[t, k] = int(logits[0].argmax())
            return torch.tensor([max(forced[k], 0)]), [None]

        drafter._pick = force
        drafter.propose([seq])
    return got


def test_teacher_forced_drafter_predicts_what_training_scores(engine, head, held_out):
    target = engine.runner.model
    argmax, gaps, features = training_predictions(head, target, held_out)
    max_len = len(held_out) + STEPS
    # Served from the weights it was saved with (`--speculative-draft-dtype bfloat16`): int8 rounds them again.
    served = with_serving_linears(load_draft_head(shipped_head_dir()), "bfloat16").attach(target)
    assert not any(isinstance(m, Linear) for m in served.modules())  # every linear on the packed bf16 kernel
    drafter = EagleDrafter(served, STEPS, SlotTables(BlockPool(-(-max_len // 16), 16), 1, max_len), torch.float32)
    first = len(held_out) - ANSWER_TOKENS - 1  # drafting starts where the answer does
    got = serving_predictions(drafter, held_out, features.float(), first)
    for k in range(STEPS):
        scored = [(t, d) for (t, kk), d in got.items() if kk == k]
        assert len(scored) >= 10, f"step {k}: too few positions scored"
        wrong = [t for t, d in scored if d != int(argmax[k][t]) and gaps[k][t] >= TIE_GAP]
        assert not wrong, f"draft step {k}: serving disagrees with training at {len(wrong)}/{len(scored)} positions"
