"""Single-turn chat prompts: a built-in set of instructions and their token ids with the chat template applied
(for benchmarks, draft training and tests)."""

from __future__ import annotations

CHAT_INSTRUCTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis in two sentences.",
    "List three prime numbers and say why they are prime.",
    "How do I reverse a list in Python?",
    "Give me a tip for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Translate 'good morning' into Spanish and French.",
]


def chat_prompt_ids(tokenizer, instructions: list[str]) -> list[list[int]]:
    """Token ids of each instruction as a single-turn chat with the generation prompt appended."""
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": s}], tokenize=False, add_generation_prompt=True)
        for s in instructions
    ]
    return [tokenizer(t, add_special_tokens=False).input_ids for t in texts]
