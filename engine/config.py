"""Configuration records: the model's architecture, the engine's limits, a request's sampling."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
GREEDY_TEMPERATURE = 1e-5
# Draft-tree nodes verified per step: with the root, 16 rows, the query rows the CPU decode-attention kernel takes per
# sequence (runner.KERNEL_ROWS; the linear kernels read each weight from memory once for any number of rows).
MAX_TREE_NODES = 15
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit seed, as OpenAI and vLLM take it
# Tokens a chunked-prefill step computes by default: max(this, 2 x max_batch), so prompts get at least as many rows
# as decode does; the trade-off between TTFT, ITL and throughput is measured in the README (bench serve).
MIN_BATCHED_TOKENS = 64
# A chunked-prefill step in which the requests waiting for their first token outnumber those streaming may compute
# up to max(this, max_num_batched_tokens) tokens: few streams wait on it, and prompt tokens cost less in fewer,
# larger steps (SGLang's max-prefill-tokens; the ratio is TGI's waiting-served ratio).
MAX_PREFILL_TOKENS = 2048
# The draft shape of `--speculative auto|DIR` when none is given: the one that decoded fastest at batch 1 with the
# shipped head, 1.65x (README, session 29), and within 5% of plain decoding at batch 8 (its adaptive policy).
DEFAULT_TREE = {"speculative_num_steps": 4, "speculative_eagle_topk": 3, "speculative_num_draft_tokens": 5,
                "speculative_ngram_branch": True}
# ... and where any of them is given (or for n-gram lookup): a chain.
DEFAULT_CHAIN = {"num_speculative_tokens": 5, "speculative_eagle_topk": 1, "speculative_ngram_branch": False}
LM_HEAD_DTYPES = ("float32", "bfloat16", "int8", "fp8")  # what the LM head's weights may be held in (lm_head.py)


class ModelLoadError(RuntimeError):
    """The model cannot be loaded; the message is a one-line reason for the user."""


@dataclass
class ModelConfig:
    """Llama-family architecture, read from a Hugging Face `config.json`."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    sliding_window: int | None = None
    rope_type: str = "default"
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ModelLoadError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ModelLoadError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        model_type = cfg.get("model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        # transformers 5 keeps the RoPE base under `rope_parameters`, older configs under `rope_theta`.
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        sliding = cfg.get("sliding_window")
        if model_type == "qwen2" and not cfg.get("use_sliding_window", False):
            sliding = None
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        try:
            heads = cfg["num_attention_heads"]
            return cls(
                model_type=model_type,
                vocab_size=cfg["vocab_size"],
                hidden_size=cfg["hidden_size"],
                intermediate_size=cfg["intermediate_size"],
                num_layers=cfg["num_hidden_layers"],
                num_heads=heads,
                num_kv_heads=cfg.get("num_key_value_heads") or heads,
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
                rope_theta=float(rope_theta),
                max_position_embeddings=cfg.get("max_position_embeddings", 2048),
                tie_word_embeddings=cfg.get("tie_word_embeddings", False),
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                sliding_window=sliding,
                rope_type=rope_type,
                eos_token_ids=eos_ids,
            )
        except KeyError as e:
            raise ModelLoadError(f"config.json lacks {e.args[0]!r}") from None

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{model_dir}: no config.json (not a Hugging Face checkpoint dir)")
        return cls.from_dict(read_json(path))


def read_json(path: Path) -> dict:
    """A JSON object from `path`; a file that is unreadable or not a JSON object is a `ModelLoadError` naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def check_lm_head_dtype(name: str, field: str = "lm_head dtype") -> str:
    """`name` if it is one of the low-precision linears' dtypes (`field`: which setting named it, for the error)."""
    if name not in LM_HEAD_DTYPES:
        raise ValueError(f"unknown {field} {name!r}; choose from {', '.join(LM_HEAD_DTYPES)}")
    return name


def check_device(name: str) -> str:
    """`name` if it is "cpu", or "cuda"/"cuda:N" and torch sees a CUDA GPU; else a clear ValueError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}; use cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}: optiserve runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: torch sees no CUDA GPU (a CPU build of torch, or no driver)")
    return name


@dataclass
class EngineConfig:
    """Limits and placement of one engine instance."""

    model: str = "default"
    dtype: str = "float32"
    device: str = "cpu"
    max_batch: int = 8
    max_model_len: int = 2048
    seed: int = 0
    speculative: str = "none"  # none | auto (the shipped/adjacent draft head) | ngram | a draft head dir
    num_speculative_tokens: int | None = None  # draft chain length; the default of speculative_num_steps
    # A dynamic draft tree (EAGLE-2, SGLang's names): `num_steps` depths, the top-k children of each frontier node,
    # the best `num_draft_tokens` nodes verified. topk 1 is the chain of num_steps tokens. A draft head with none
    # of these five set drafts DEFAULT_TREE (as SGLang chooses them when unset); else unset ones give a chain of
    # DEFAULT_CHAIN tokens.
    speculative_num_steps: int | None = None
    speculative_eagle_topk: int | None = None
    speculative_num_draft_tokens: int | None = None
    speculative_ngram_branch: bool | None = None  # n-gram lookup candidates enter the head's tree as an extra branch
    # A tree keeps only nodes this likely (the head's cumulative probability, the n-gram branch's learned accuracy),
    # up to num_draft_tokens, and expands no depth whose best candidate is below it: the head's probabilities are
    # calibrated (README), so a node adds its probability in expected tokens for one verify row. 0: EAGLE-2's tree.
    # Not a shape field: given alone it keeps the default tree.
    speculative_min_prob: float = 0.0
    speculative_adaptive: bool = True  # per step, draft only as much as pays (engine/spec/policy.py)
    speculative_draft_dtype: str = "int8"  # the draft head's linears (spec/draft_head.with_serving_linears)
    lm_head_dtype: str = "float32"  # the served LM head's weights (engine/lm_head.py); the master keeps fp32
    kv_block_size: int = 16  # tokens per KV block; 0: one block of the whole context per sequence (unpaged)
    # Bytes of KV blocks (the target's), or a fraction in (0, 1) of the device's memory; None: max_batch full-length
    # sequences.
    kv_cache_memory: float | None = None
    kv_cache_format: str = "none"  # the KV format kv_cache_memory is counted in (the one served from start-up)
    # Full prompt blocks reused across requests by content (block_manager.py); None: on where it works
    # (--speculative none or ngram), as it never changes an output (tests/engine/test_paged.py).
    enable_prefix_caching: bool | None = None
    # Chunked prefill: tokens one step computes, decode rows first, then chunks of prompts (0: whole prompts;
    # None: max(MIN_BATCHED_TOKENS, 2 x max_batch) where it works, --speculative none).
    max_num_batched_tokens: int | None = None
    # With chunked prefill, tokens a step computes while prompts waiting for a first token outnumber the streams;
    # None: the larger of MAX_PREFILL_TOKENS and max_num_batched_tokens.
    max_prefill_tokens: int | None = None
    default_tree: bool = field(default=False, init=False)  # whether the draft shape is DEFAULT_TREE, unasked

    def __post_init__(self) -> None:
        check_lm_head_dtype(self.lm_head_dtype)
        check_lm_head_dtype(self.speculative_draft_dtype, "speculative_draft_dtype")
        self._choose_draft_shape()
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError("num_speculative_tokens (speculative_num_steps) must be in [1, 16]")
        self._check_tree()
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype must be float32 or bfloat16, not {self.dtype!r}")
        if self.max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if self.max_model_len < 16:
            raise ValueError("max_model_len must be >= 16")
        if self.kv_block_size < 0:
            raise ValueError("kv_block_size must be >= 0 (0: one block per sequence)")
        if self.kv_cache_memory is not None and not self.kv_cache_memory > 0:  # NaN too
            raise ValueError("kv_cache_memory must be bytes (>= 1) or a fraction of the device's memory (0-1)")
        self._resolve_batching()
        if self.device != "cpu" and self.speculative != "none":
            raise ValueError("speculative decoding runs on the CPU engine only so far; drop --speculative on a GPU")
        check_device(self.device)

    def _resolve_batching(self) -> None:
        """Chunked prefill and prefix caching: on by default where they work, refused where they cannot."""
        if self.enable_prefix_caching is None:
            self.enable_prefix_caching = self.speculative in ("none", "ngram")
        if self.max_num_batched_tokens is None:
            chunked = self.speculative == "none"
            self.max_num_batched_tokens = max(MIN_BATCHED_TOKENS, 2 * self.max_batch) if chunked else 0
        if self.enable_prefix_caching and self.speculative not in ("none", "ngram"):
            raise ValueError("prefix caching works with --speculative none or ngram: a draft head reads the "
                             "target's features at every prompt position")
        if self.max_num_batched_tokens < 0 or 0 < self.max_num_batched_tokens < self.max_batch:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_batch "
                             f"({self.max_batch}): every running sequence decodes one token per step")
        if self.max_prefill_tokens is None:
            budget = self.max_num_batched_tokens
            self.max_prefill_tokens = max(MAX_PREFILL_TOKENS, budget) if budget else 0  # 0: whole prompts
        if self.max_prefill_tokens < self.max_num_batched_tokens:
            raise ValueError(f"max_prefill_tokens ({self.max_prefill_tokens}) must be >= max_num_batched_tokens "
                             f"({self.max_num_batched_tokens})")
        if self.max_num_batched_tokens and self.speculative != "none":
            raise ValueError("chunked prefill (max_num_batched_tokens) works with --speculative none so far: "
                             "speculative steps verify whole drafts and a draft head reads every prompt position")

    def _choose_draft_shape(self) -> None:
        """Fill the unset draft-shape fields: DEFAULT_TREE for a draft head given none of them (`default_tree`:
        a model with a sliding window then gets the chain, spec/decoder.py), else the chain's defaults."""
        shape = {name: getattr(self, name) for name in (*DEFAULT_TREE, "num_speculative_tokens")}
        self.default_tree = self.speculative not in ("none", "ngram") and all(v is None for v in shape.values())
        for name, value in (DEFAULT_TREE if self.default_tree else DEFAULT_CHAIN).items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.speculative_num_steps is None:
            self.speculative_num_steps = self.num_speculative_tokens
        self.num_speculative_tokens = self.speculative_num_steps  # one chain length, whichever name set it

    def _check_tree(self) -> None:
        steps, topk = self.speculative_num_steps, self.speculative_eagle_topk
        if not 1 <= topk <= MAX_TREE_NODES:
            raise ValueError(f"speculative_eagle_topk must be in [1, {MAX_TREE_NODES}]")
        if self.speculative_num_draft_tokens is None:
            self.speculative_num_draft_tokens = steps if topk == 1 else min(MAX_TREE_NODES, steps * topk)
        n = self.speculative_num_draft_tokens
        if topk == 1 and n != steps:
            raise ValueError(f"with speculative_eagle_topk 1 the draft is a chain of num_steps ({steps}) tokens, "
                             f"not {n}")
        if topk > 1 and not 1 <= n <= MAX_TREE_NODES:
            raise ValueError(f"speculative_num_draft_tokens must be in [1, {MAX_TREE_NODES}] for a tree")
        if not 0.0 <= self.speculative_min_prob < 1.0:
            raise ValueError("speculative_min_prob must be in [0, 1)")
        if self.speculative_min_prob and not self.tree:
            raise ValueError("speculative_min_prob prunes a draft tree: give --speculative-eagle-topk > 1 or "
                             "--speculative-ngram-branch")
        if (topk > 1 or self.speculative_ngram_branch) and self.speculative == "ngram":
            raise ValueError("a draft tree needs a draft head: --speculative-eagle-topk > 1 with --speculative "
                             "auto|DIR")

    @property
    def tree(self) -> bool:
        """Whether the head drafts a tree (a chain with an n-gram branch is one too)."""
        return self.speculative_eagle_topk > 1 or self.speculative_ngram_branch

    @property
    def spec_cache_room(self) -> int:
        """Cache positions past a sequence's end that speculation writes before rolling back (0 without it): the
        verify rows, and the draft head's tree slots."""
        if self.speculative == "none":
            return 0
        drafted = max(self.speculative_num_draft_tokens, self.speculative_num_steps * self.speculative_eagle_topk)
        return 1 + drafted


@dataclass
class SamplingParams:
    """How one sequence picks its tokens and when it stops."""

    max_tokens: int | None = None  # None: the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    seed: int | None = None
    n: int = 1
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-k logprobs per generated token (0 = only the chosen token)
    prompt_logprobs: int | None = None  # same for prompt tokens (echo)

    def __post_init__(self) -> None:
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if not 0.0 <= self.temperature <= 2.0:
            raise ValueError("temperature must be in [0, 2]")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < -1:
            raise ValueError("top_k must be -1 (off) or >= 0")
        if self.n < 1:
            raise ValueError("n must be >= 1")
        if self.seed is not None and not SEED_MIN <= self.seed <= SEED_MAX:
            raise ValueError(f"seed must be in [{SEED_MIN}, {SEED_MAX}] (a signed 64-bit integer)")

    @property
    def greedy(self) -> bool:
        # Below ~1e-5, logits / temperature overflows to inf: such a temperature means greedy (as in vLLM).
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1
