"""The speculative options, spelled as SGLang spells them, reach the engine's config through `optiserve serve`'s
parser (no model is loaded: the config is what the command would build its engine from)."""

import pytest

from optiserve.engine.config import DEFAULT_TREE, EngineConfig
from optiserve.server.cli.args import engine_config
from optiserve.server.cli.main import build_parser


def config_of(*flags: str) -> EngineConfig:
    return engine_config(build_parser().parse_args(["serve", "--speculative", "auto", *flags]))


def test_tree_flags_reach_the_engine_config():
    cfg = config_of("--speculative-num-steps", "4", "--speculative-eagle-topk", "3",
                    "--speculative-num-draft-tokens", "12", "--speculative-min-prob", "0.1",
                    "--no-speculative-ngram-branch", "--no-speculative-adaptive")
    assert cfg.tree and not cfg.default_tree and not cfg.speculative_adaptive
    assert (cfg.speculative_num_steps, cfg.speculative_eagle_topk, cfg.speculative_num_draft_tokens,
            cfg.speculative_min_prob, cfg.speculative_ngram_branch) == (4, 3, 12, 0.1, False)


def test_topk_1_is_the_chain():
    cfg = config_of("--speculative-eagle-topk", "1", "--speculative-num-steps", "3")
    assert not cfg.tree and (cfg.num_speculative_tokens, cfg.speculative_num_draft_tokens) == (3, 3)


def test_no_shape_flag_gives_the_default_tree():
    cfg = config_of()
    assert cfg.default_tree and {name: getattr(cfg, name) for name in DEFAULT_TREE} == DEFAULT_TREE


@pytest.mark.parametrize("flags", [
    ("--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "7"),
    ("--speculative-eagle-topk", "1", "--speculative-min-prob", "0.1"),
    ("--speculative-num-draft-tokens", "17"),
])
def test_contradicting_tree_flags_are_refused(flags):
    with pytest.raises(ValueError):
        config_of(*flags)
