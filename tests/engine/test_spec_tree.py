"""The dynamic draft tree on the real model: tree-mask verify equals a forward over each root-to-node path,
keeping the accepted path leaves the cache as if only it was written, and greedy output with trees equals plain
decoding (fp32 and every weight and KV format)."""

import math
from types import SimpleNamespace

import pytest
import torch

from optiserve.engine.block_manager import BlockPool
from optiserve.engine.config import EngineConfig, SamplingParams
from optiserve.engine.kv_cache import SlotTables
from optiserve.engine.llm_engine import LLMEngine, WeightSet
from optiserve.engine.spec.decoder import draft_depth, shipped_head_dir
from optiserve.engine.spec.draft_head import DraftHead, load_draft_head, with_serving_linears
from optiserve.engine.spec.drafters import EagleDrafter, EagleState
from optiserve.engine.spec.tree_drafter import EagleTreeDrafter, add_branch
from optiserve.engine.weight_formats import weight_format
from optiserve.optimize.ptq_pipeline import QuantRequest, prepare_quantized

from .test_speculative import EXACT, GREEDY, assert_same_greedy, generate

# The full tree every step (the adaptive budget would shrink it; test_spec_policy covers that).
TREE = {"speculative": "auto", "speculative_num_steps": 4, "speculative_eagle_topk": 3,
        "speculative_num_draft_tokens": 8, "speculative_ngram_branch": True, "speculative_adaptive": False}
# Root (row 0) and 9 nodes, parents first: two branches from the root, a deeper one and a sibling pair.
PARENTS = [-1, 0, 0, 1, 1, 3, 2, 6, 6, 5]


def random_tree_tokens(seed: int) -> list[int]:
    return torch.randint(0, 1000, (len(PARENTS),), generator=torch.Generator().manual_seed(seed)).tolist()


def path_to(row: int) -> list[int]:
    path = [row]
    while PARENTS[path[-1]] >= 0:
        path.append(PARENTS[path[-1]])
    return path[::-1]


def verify_tree(runner, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Prefill all but the last prompt token, then verify the tree rooted at it; logits [W, V]."""
    runner.cache.truncate(0, 0)
    runner.prefill(0, prompt[:-1])
    start = len(prompt) - 1
    logits, _ = runner.verify_tree([tokens], [start], [PARENTS])
    return logits[0]


def verify_chain(runner, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    runner.cache.truncate(0, 0)
    runner.prefill(0, prompt[:-1])
    return runner.verify([tokens], [len(prompt) - 1])[0][0]


@pytest.fixture(scope="module")
def base():
    return LLMEngine(EngineConfig(max_batch=4, max_model_len=1024))


def test_tree_verify_equals_a_forward_over_each_path(base, chat_prompt_ids):
    """Every row of a tree verify scores as a chain verify over the path root..row does (bit for bit with the CPU
    kernels: the tree row attends the same keys in the same order)."""
    prompt = chat_prompt_ids[2]
    tokens = [prompt[-1], *random_tree_tokens(0)[1:]]
    tree = verify_tree(base.runner, prompt, tokens)
    for row in range(len(PARENTS)):
        chain = verify_chain(base.runner, prompt, [tokens[r] for r in path_to(row)])[-1]
        if EXACT:
            assert torch.equal(tree[row], chain), row
        else:
            torch.testing.assert_close(tree[row], chain, rtol=1e-4, atol=1e-4)


def test_keeping_a_path_leaves_the_cache_as_if_only_it_was_written(base, chat_prompt_ids):
    runner, prompt = base.runner, chat_prompt_ids[0]
    tokens = [prompt[-1], *random_tree_tokens(1)[1:]]
    start, path = len(prompt) - 1, path_to(9)  # rows 0, 1, 3, 5, 9: moved to start + 0..4
    verify_tree(runner, prompt, tokens)
    runner.cache.keep_path(0, start, path, start + len(tokens))
    kept = start + len(path)
    assert len(runner.cache.tables.tables[0].blocks) == runner.cache.tables.pool.blocks_for(kept)
    k_kept, v_kept = runner.cache.read(0, kept)
    verify_chain(runner, prompt, [tokens[r] for r in path])
    k_chain, v_chain = runner.cache.read(0, kept)
    runner.cache.truncate(0, 0)
    if EXACT:
        assert torch.equal(k_kept, k_chain) and torch.equal(v_kept, v_chain)
    else:
        torch.testing.assert_close(k_kept, k_chain, rtol=1e-4, atol=1e-4)


# Trees of different sizes in one verify: the PARENTS tree, a sequence drafting nothing, a 3-token chain.
RAGGED = [PARENTS, [-1], [-1, 0, 1, 2]]
RAGGED_PATHS = [path_to(9), [0], [0, 1, 2]]


def verify_trees(runner, prompts: list[list[int]], ragged: bool) -> list:
    """Verify RAGGED's trees (tokens random but for each root, its prompt's last) for `prompts` in slots 0..2,
    one row per node or padded to [B, W]; keep RAGGED_PATHS. Per sequence: logits, captured features and the
    cache K/V after keeping its path."""
    for b, prompt in enumerate(prompts):
        runner.cache.truncate(b, 0)
        runner.prefill(b, prompt[:-1])
    starts = [len(p) - 1 for p in prompts]
    tokens = [[p[-1], *random_tree_tokens(b)[1 : len(par)]]
              for b, (p, par) in enumerate(zip(prompts, RAGGED, strict=True))]
    sizes, width = [len(t) for t in tokens], len(PARENTS)
    if ragged:
        logits, feats = runner.verify_ragged(tokens, starts, RAGGED, capture=(3,))
        logits, feats = logits.split(sizes), feats.split(sizes)
    else:
        padded = [t + [0] * (width - len(t)) for t in tokens]
        parents = [par + [-1] * (width - len(par)) for par in RAGGED]
        logits, feats = runner.verify_tree(padded, starts, parents, capture=(3,))
        logits, feats = ([x[:n] for x, n in zip(rows, sizes, strict=True)] for rows in (logits, feats))
    out = []
    for b, (start, path) in enumerate(zip(starts, RAGGED_PATHS, strict=True)):
        runner.cache.keep_path(b, start, path, start + width)
        out.append((logits[b], feats[b], *runner.cache.read(b, start + len(path))))
        runner.cache.truncate(b, 0)
    return out


@pytest.mark.skipif(not EXACT, reason="ragged verify runs where the CPU attention kernel does")
def test_ragged_verify_equals_the_padded_verify(base, chat_prompt_ids):
    """Trees of different sizes scored one row per node (no padding rows) give every row's logits and features,
    and the kept paths' cache, exactly as the padded [B, W] tree verify does."""
    prompts = chat_prompt_ids[:3]
    ragged, padded = verify_trees(base.runner, prompts, True), verify_trees(base.runner, prompts, False)
    for got, want in zip(ragged, padded, strict=True):
        for g, w in zip(got, want, strict=True):
            assert torch.equal(g, w)


@pytest.mark.parametrize("kv", ["fp8", "nvfp4"])
def test_tree_rows_and_kept_paths_on_a_quantized_kv_cache(base, chat_prompt_ids, kv):
    """The same two claims with packed KV pools: the kernel reads codes for tree and chain rows alike, and keeping
    a path moves codes and block scales."""
    req = QuantRequest("none", kv, calib_samples=4, calib_seq_len=128)
    base.use_weights(prepare_quantized(base.model_dir, base.master, base.tokenizer, req))
    try:
        test_tree_verify_equals_a_forward_over_each_path(base, chat_prompt_ids)
        test_keeping_a_path_leaves_the_cache_as_if_only_it_was_written(base, chat_prompt_ids)
    finally:
        base.use_weights(WeightSet(base.master, "none"))


@pytest.fixture(scope="module")
def tree_engine():
    return LLMEngine(EngineConfig(max_batch=4, max_model_len=1024, **TREE))


def test_greedy_identical_with_trees(base, tree_engine, chat_prompt_ids):
    ref = generate(base, chat_prompt_ids[:4], GREEDY, at_once=False)
    got = generate(tree_engine, chat_prompt_ids[:4], GREEDY, at_once=True)
    assert_same_greedy(ref, got)
    spec = [s for *_, s in got]
    assert all(s.drafts > 0 for s in spec)
    assert sum(s.draft_tokens for s in spec) > 4 * sum(s.drafts for s in spec)  # trees, not single drafts


def test_greedy_identical_with_pruned_trees(base, tree_engine, chat_prompt_ids):
    """Pruned to nodes at least 10% likely: fewer nodes, some steps with none, and still the plain greedy tokens."""
    drafter = tree_engine.spec.drafter
    drafter.min_score = math.log(0.1)
    try:
        got = generate(tree_engine, chat_prompt_ids[:4], GREEDY, at_once=True)
    finally:
        drafter.min_score = -math.inf
    assert_same_greedy(generate(base, chat_prompt_ids[:4], GREEDY, at_once=False), got)
    spec = [s for *_, s in got]
    assert sum(s.draft_tokens for s in spec) < 8 * sum(s.drafts for s in spec)
    assert sum(s.skipped_steps for s in spec) > 0  # pruned to nothing: the step decodes the target's token alone


@pytest.mark.parametrize("quant,kv", [("int4", "none"), ("int8", "fp8"), ("fp8", "none"), ("int4-w4a8", "none"),
                                     ("nvfp4-w4a16", "nvfp4")])
def test_greedy_identical_with_trees_on_every_format(base, tree_engine, chat_prompt_ids, quant, kv):
    """Every weight format and both quantized KV caches (fp32 above; nvfp4 W4A4 with an nvfp4 cache in
    test_speculative). Formats that round activations flip a rounding at any last-bit difference between the tree's
    rows and the decode steps: they are a claim about the CPU kernels."""
    if weight_format(quant).quantizes_activations and not EXACT:
        pytest.skip("activations rounded: identity needs the CPU kernels' bit-identical rows")
    req = QuantRequest(quant, kv, calib_samples=4, calib_seq_len=128)
    for engine in (base, tree_engine):
        engine.use_weights(prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, req))
    try:
        ref = generate(base, chat_prompt_ids[4:6], GREEDY, at_once=False)
        assert_same_greedy(ref, generate(tree_engine, chat_prompt_ids[4:6], GREEDY, at_once=True))
    finally:
        for engine in (base, tree_engine):
            engine.use_weights(WeightSet(engine.master, "none"))


def test_sampled_requests_draft_chains_and_stay_seeded(tree_engine, chat_prompt_ids):
    params = SamplingParams(max_tokens=16, temperature=0.8, seed=3)
    first = generate(tree_engine, chat_prompt_ids[:2], params, at_once=True)
    again = generate(tree_engine, chat_prompt_ids[:2], params, at_once=True)
    assert [ids for ids, *_ in first] == [ids for ids, *_ in again] and all(ids for ids, *_ in first)
    chain = tree_engine.cfg.speculative_num_steps  # 4 tokens a step at most, where a tree drafts 8 nodes
    assert all(s.drafts > 0 and s.draft_tokens <= chain * s.drafts for *_, s in first)


@pytest.mark.parametrize("fields", [
    {"speculative_eagle_topk": 1, "speculative_num_draft_tokens": 7},  # a chain has num_steps tokens
    {"speculative_eagle_topk": 4, "speculative_num_draft_tokens": 16},  # past one 16-row verify
    {"speculative_eagle_topk": 0},
    {"speculative": "ngram", "speculative_eagle_topk": 2},
    {"speculative_draft_dtype": "int4"},  # the draft head's linears take the LM head's dtypes
    {"speculative_min_prob": 1.0},
    {"speculative_min_prob": -0.1},
    {"speculative_eagle_topk": 1, "speculative_min_prob": 0.1},  # a chain: nothing to prune
])
def test_tree_settings_are_checked(fields):
    with pytest.raises(ValueError):
        EngineConfig(**{"speculative": "auto", **fields})


def test_a_pruning_threshold_alone_keeps_the_default_tree():
    cfg = EngineConfig(speculative="auto", speculative_min_prob=0.1)
    assert cfg.default_tree and cfg.tree and cfg.speculative_min_prob == 0.1


def test_chain_length_alias():
    assert EngineConfig(num_speculative_tokens=3).speculative_num_steps == 3
    cfg = EngineConfig(speculative="auto", speculative_num_steps=4, speculative_eagle_topk=3)
    assert (cfg.num_speculative_tokens, cfg.speculative_num_draft_tokens, cfg.spec_cache_room) == (4, 12, 13)


def tree_drafter_after(base, prompt: list[int], dtype: str):
    """The shipped head (linears in `dtype`) as a 4-depth, top-3, 8-node tree drafter over its own cache, after the
    target read `prompt` in slot 0: (drafter, the prompt's features [S, 3H], a greedy sequence to draft for)."""
    head = with_serving_linears(load_draft_head(shipped_head_dir()), dtype).attach(base.runner.model)
    tables = SlotTables(BlockPool(64, 16), 1, 1024)
    drafter = EagleTreeDrafter(head, 4, 3, 8, tables, torch.float32)
    base.runner.cache.truncate(0, 0)
    _, features = base.runner.prefill_features(0, prompt, capture=drafter.capture)
    tables.admit(0, prompt, lookup=False)
    return drafter, features, SimpleNamespace(token_ids=prompt + [0], params=SamplingParams(temperature=0),
                                              draft_state=None, slot=0)


def test_a_smaller_budget_drafts_the_full_trees_best_nodes_from_fewer_depths(base, chat_prompt_ids):
    """The adaptive budget asks a tree for b < num_draft_tokens nodes (b = 1: a probe): it expands only b depths
    (one head forward for a probe, not num_steps) and still gets the b best nodes of the full expansion."""
    drafter, features, seq = tree_drafter_after(base, chat_prompt_ids[2], "bfloat16")
    head = drafter.head
    runs = []
    head_steps = head.step

    def counted(*args, **kwargs):
        runs.append(1)
        return head_steps(*args, **kwargs)

    head.step = counted
    for budget in (8, 4, 2, 1):
        seq.draft_state = EagleState([features])  # the same prefix to catch up on for every budget
        h, ends = drafter._catch_up([seq])
        full = [c[0] for c in drafter._expand([seq], h, ends, 4)]
        seq.draft_state, runs[:] = EagleState([features]), []
        got = drafter.propose([seq], budget)[0]
        want = drafter._best_subtree(*full, budget)
        assert (got.tokens, got.parents) == (want.tokens, want.parents)
        assert len(runs) == min(budget, 4) and draft_depth(got) <= min(budget, 4)


def test_a_pruned_tree_keeps_the_likely_nodes_and_expands_no_deeper_than_them(base, chat_prompt_ids):
    """`min_prob`: the tree is the unpruned tree's nodes at least that likely (cumulative probability), and no
    depth is expanded once its best candidate is below it (a child never scores above its parent): fewer head
    forwards where the head is unsure."""
    drafter, features, seq = tree_drafter_after(base, chat_prompt_ids[3], "bfloat16")
    runs, head_steps = [], drafter.head.step

    def counted(*args, **kwargs):
        runs.append(1)
        return head_steps(*args, **kwargs)

    drafter.head.step = counted
    seq.draft_state = EagleState([features])
    h, ends = drafter._catch_up([seq])
    scores, tokens, parents = (c[0] for c in drafter._expand([seq], h, ends, 4))
    score_of = dict(zip(paths(drafter.head.d2t[tokens].tolist(), parents.tolist()), scores.tolist(), strict=True))
    seq.draft_state = EagleState([features])
    full = drafter.propose([seq])[0]
    unpruned = paths(full.tokens, full.parents)
    ranked = sorted(score_of.values(), reverse=True)
    for kept in (3, 7, 0):
        drafter.min_score = (ranked[kept - 1] + ranked[kept]) / 2 if kept else ranked[0] + 1e-3
        seq.draft_state, runs[:] = EagleState([features]), []
        prop = drafter.propose([seq])[0]
        got = paths(prop.tokens, prop.parents)
        assert got == [p for p in unpruned if score_of[p] >= drafter.min_score] and len(got) == kept
        deepest = max((len(p) for p, sc in score_of.items() if sc >= drafter.min_score), default=0)
        assert len(runs) == 1 + min(deepest, 3)  # the catch-up, then a forward per depth worth expanding


@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_the_draft_heads_kernel_step_gives_the_modules_results_bit_for_bit(base, chat_prompt_ids, stack_calls, dtype):
    """Where it applies, a head forward is one kernel call (`draft_head_step`): the catch-up over a prompt's
    features, a tree's depths and a chain step must give the module path's states, logits and drafts bit for bit,
    with the head's linears in each serving dtype."""
    drafter, features, seq = tree_drafter_after(base, chat_prompt_ids[1], dtype)
    watch, refuse = stack_calls

    def drafts() -> tuple[torch.Tensor, ...]:
        seq.draft_state = EagleState([features])
        h, ends = drafter._catch_up([seq])  # every prompt position, then a tree of 4 depths, then a chain step
        chain_step = drafter._run([seq], torch.tensor([[17]]), h, ends[:, None], True)
        return h, *drafter._expand([seq], h, ends, 4), *chain_step

    stacked = watch(DraftHead, "head_stack")
    fused = drafts()
    assert stacked == [True] * 5  # catch-up, 3 tree depths, the chain step
    refuse(DraftHead, "head_stack")
    for a, b in zip(fused, drafts(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("tree", [True, False], ids=["tree", "chain"])
def test_a_sequence_drafts_alone_what_it_drafts_beside_the_others(base, chat_prompt_ids, tree):
    """A probe at batch > 1 drafts for one sequence (the head catches up on its backlog alone): the head must read
    and write that sequence's own cache slot, so the drafts of the sequence in slot 1 alone are those it gets in
    the batch of slots 0 and 1."""
    head = with_serving_linears(load_draft_head(shipped_head_dir()), "bfloat16").attach(base.runner.model)
    tables = SlotTables(BlockPool(128, 16), 2, 1024)
    args = (head, 4, 3, 8, tables, torch.float32) if tree else (head, 4, tables, torch.float32)
    drafter = EagleTreeDrafter(*args) if tree else EagleDrafter(*args)
    seqs, features = [], []
    for slot, prompt in enumerate(chat_prompt_ids[1:3]):
        base.runner.cache.truncate(slot, 0)
        features.append(base.runner.prefill_features(slot, prompt, capture=drafter.capture)[1])
        tables.admit(slot, prompt, lookup=False)
        seqs.append(SimpleNamespace(token_ids=prompt + [0], params=SamplingParams(temperature=0), slot=slot))

    def drafts(batch):
        for seq, f in zip(seqs, features, strict=True):
            seq.draft_state = EagleState([f])
        return [(p.tokens, p.parents) for p in drafter.propose(batch)]

    together, alone = drafts(seqs), drafts(seqs[1:])
    assert alone == together[1:] and together[0] != together[1] and all(t for t, _ in together)
    assert drafter.backlog(seqs[0]) == len(features[0])  # the sequence left out still has its prompt to read


def test_the_head_is_steady_once_it_read_all_but_the_last_verify(base, chat_prompt_ids):
    """`steady`: drafting costs a steady step's time only when the head's backlog is the last verify's positions
    (not a prompt, not the positions of steps that drafted nothing)."""
    drafter, features, seq = tree_drafter_after(base, chat_prompt_ids[2], "bfloat16")
    seq.draft_state = EagleState([features])
    assert not drafter.steady([seq])  # the prompt is unread
    drafter._catch_up([seq])
    assert drafter.steady([seq])
    drafter.on_verify(seq, features[:2])
    assert drafter.steady([seq])  # one verify's positions: every step reads those
    drafter.on_verify(seq, features[:1])
    assert not drafter.steady([seq])  # a step that drafted nothing left its position too


def test_ngram_branch_shares_the_nodes_it_agrees_with():
    scores, ids, parents = [-0.1, -0.5, -0.6, -0.9], [5, 6, 7, 8], [-1, 0, -1, 1]  # 5 -> 6 -> 8, and 7
    add_branch(scores, ids, parents, [5, 6, 9, 4], [-0.2, -0.3, -0.4, -0.5])  # follows 5 -> 6, adds 9 -> 4 under 6
    assert (ids, parents) == ([5, 6, 7, 8, 9, 4], [-1, 0, -1, 1, 1, 4])
    assert scores == [-0.1, -0.3, -0.6, -0.9, -0.4, -0.5]  # a shared node keeps the likelier score
    assert all(p < 0 or scores[c] <= scores[p] for c, p in enumerate(parents))  # no child above its parent
    unchanged = ([-0.1], [5], [-1])
    add_branch(*unchanged, [], [])
    assert unchanged == ([-0.1], [5], [-1])


def paths(tokens: list[int], parents: list[int]) -> list[tuple[int, ...]]:
    """Each node's tokens from the root, parents first."""
    out: list[tuple[int, ...]] = []
    for token, parent in zip(tokens, parents, strict=True):
        out.append((*(out[parent] if parent >= 0 else ()), token))
    return out


@pytest.mark.parametrize("budget", [3, 7])
def test_the_lookup_competes_with_the_heads_nodes_for_the_budget(base, chat_prompt_ids, budget):
    """With a lookup the tree still has `budget` connected nodes, each no less likely than any candidate left out
    whose parent is in; a likelier lookup keeps at least as many of its nodes."""
    drafter, features, seq = tree_drafter_after(base, chat_prompt_ids[2], "bfloat16")
    seq.draft_state = EagleState([features])
    h, ends = drafter._catch_up([seq])
    scores, tokens, parents = (c[0] for c in drafter._expand([seq], h, ends, 4))
    chain = [t for t in range(1000, 1100) if t not in drafter.head.d2t[tokens].tolist()][:budget]
    kept_of_chain = []
    for first in (0.2, 0.6, 0.95):  # a lookup the learned accuracy trusts more and more
        chain_scores = [math.log(first) + j * math.log(0.8) for j in range(len(chain))]
        tree = drafter._best_subtree(scores, tokens, parents, budget, (chain, chain_scores))
        assert len(tree.tokens) == budget and all(p < i for i, p in enumerate(tree.parents))
        cand_scores, ids, parent_of = scores.tolist(), drafter.head.d2t[tokens].tolist(), parents.tolist()
        add_branch(cand_scores, ids, parent_of, chain, chain_scores)
        path_of = paths(ids, parent_of)  # a node is known by its path: a token may hang from two parents
        kept = {path_of.index(p) for p in paths(tree.tokens, tree.parents)}
        left_out = [c for c in range(len(ids)) if c not in kept and (parent_of[c] < 0 or parent_of[c] in kept)]
        assert min(cand_scores[c] for c in kept) >= max(cand_scores[c] for c in left_out)
        kept_of_chain.append(sum(t in chain for t in tree.tokens))
    assert kept_of_chain == sorted(kept_of_chain)
