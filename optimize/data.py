"""Text data for calibration, evaluation and training: plain text or jsonl, cut into token windows."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

DEFAULT_CALIB_FILE = "calib_wikitext2_valid.txt"


def default_calib_path() -> Path:
    """The small calibration slice shipped inside the package (see optimize/data/README.md)."""
    return Path(str(resources.files("optiserve.optimize") / "data" / DEFAULT_CALIB_FILE))


def read_texts(path: str | Path, tokenizer=None) -> list[str]:
    """Documents from a file: `.jsonl` rows (`text`, chat `messages`, or `instruction`[+`output`]) or plain text.

    Chat rows are rendered with the tokenizer's chat template, so training sees what serving sees.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if path.suffix != ".jsonl":
        return [path.read_text()]
    texts = []
    for line in path.read_text().splitlines():
        if line.strip():
            texts.append(render_row(json.loads(line), tokenizer))
    return texts


def render_row(row: dict, tokenizer) -> str:
    if "text" in row:
        return row["text"]
    if "messages" in row:
        messages = row["messages"]
    elif "instruction" in row:
        messages = [{"role": "user", "content": row["instruction"]}]
        if row.get("output"):
            messages.append({"role": "assistant", "content": row["output"]})
    else:
        raise ValueError(f"jsonl row has none of text/messages/instruction: {sorted(row)}")
    if tokenizer is None:
        return "\n".join(m["content"] for m in messages)
    return tokenizer.apply_chat_template(messages, tokenize=False)


def token_windows(tokenizer, texts: list[str], window: int, max_windows: int | None = None) -> list[list[int]]:
    """Concatenate the texts' tokens and cut consecutive, non-overlapping windows of `window` tokens."""
    ids: list[int] = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False).input_ids
        if max_windows is not None and len(ids) >= window * max_windows:
            break
    count = len(ids) // window if max_windows is None else min(len(ids) // window, max_windows)
    if count == 0:
        raise ValueError(f"the data has {len(ids)} tokens, fewer than one window of {window}")
    return [ids[i * window : (i + 1) * window] for i in range(count)]


def training_windows(tokenizer, paths: list[str], window: int) -> list[list[int]]:
    """Every file's `window`-token windows (each file cut on its own, so no window spans two sources)."""
    if not paths:
        raise ValueError("give at least one --data file")
    windows: list[list[int]] = []
    for path in paths:
        windows += token_windows(tokenizer, read_texts(path, tokenizer), window)
    return windows
