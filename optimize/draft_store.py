"""An on-disk, resumable store of draft-head training samples: safetensors shards plus a JSON manifest.

Each shard holds the sequences added since the previous one, concatenated: `tokens` and `labels` [N] int32,
`features` [N, 3H] bf16, `offsets` [n + 1] int64 (where each sequence starts) and, in a store with `top_k` > 0,
the target's top-k next tokens `top_ids` [N, K] int32 with their probabilities `top_probs` [N, K] fp16. A shard
is written to a temporary name and renamed, then the manifest (shards, and how many units of each job they cover)
is replaced the same way — so a writer killed at any point leaves a readable prefix, and a rerun continues from
the units the manifest records. Readers memory-map the shards (`safe_open`) and copy out only the rows a batch needs.

Disk budget: 2 bytes per feature (3H = 1728 for a 576-wide target) + 8 for token and label + 6 per top-k entry:
3,464 B per token, 3,512 with the top 8.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .draft_data import DraftSample

MANIFEST = "manifest.json"
MIN_FREE_BYTES = 4 << 30  # stop writing before the disk fills up for everyone else


def bytes_per_token(width: int, top_k: int = 0) -> int:
    return 2 * width + 4 + 4 + 6 * top_k


def _replace_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


class StoreWriter:
    """Buffers samples of a job and writes a shard once `shard_tokens` are buffered (or on `flush`). Samples carry
    the target's top `top_k` next tokens when `top_k` > 0 (the labelling jobs read it from `writer.top_k`)."""

    def __init__(self, root: str | Path, width: int, shard_tokens: int = 65_536, top_k: int = 0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_tokens = shard_tokens
        path = self.root / MANIFEST
        self.manifest = json.loads(path.read_text()) if path.is_file() else {"width": width, "top_k": top_k,
                                                                              "shards": [], "progress": {}}
        for key, want in (("width", width), ("top_k", top_k)):
            if self.manifest.get(key, 0) != want:
                raise ValueError(f"{self.root}: stored with {key} {self.manifest.get(key, 0)}, not {want}")
        self._buffer: list[DraftSample] = []
        self._pending: dict[str, int] = {}

    @property
    def top_k(self) -> int:
        return self.manifest.get("top_k", 0)

    def done(self, job: str) -> int:
        """Units of `job` already stored (a rerun starts there)."""
        return self.manifest["progress"].get(job, 0)

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.manifest["shards"])

    def add(self, job: str, units_done: int, samples: list[DraftSample]) -> None:
        """Samples of `job` up to unit `units_done` (exclusive); stored for good once their shard is written."""
        self._buffer += samples
        self._pending[job] = units_done
        if sum(len(s.tokens) for s in self._buffer) >= self.shard_tokens:
            self.flush()

    def flush(self) -> None:
        if self._buffer:
            self._write_shard()
        self.manifest["progress"].update(self._pending)
        self._pending = {}
        _replace_json(self.root / MANIFEST, self.manifest)

    def _write_shard(self) -> None:
        n = sum(len(s.tokens) for s in self._buffer)
        need = n * bytes_per_token(self.manifest["width"], self.top_k)
        if shutil.disk_usage(self.root).free < need + MIN_FREE_BYTES:
            raise OSError(f"{self.root}: less than {MIN_FREE_BYTES >> 30} GiB would be left on the disk")
        lengths = torch.tensor([0] + [len(s.tokens) for s in self._buffer])
        tensors = {
            "tokens": torch.cat([s.tokens for s in self._buffer]).to(torch.int32),  # [N]
            "labels": torch.cat([s.labels for s in self._buffer]).to(torch.int32),  # [N]
            "features": torch.cat([s.features for s in self._buffer]).to(torch.bfloat16).contiguous(),  # [N, 3H]
            "offsets": lengths.cumsum(0),  # [n + 1]
        }
        if self.top_k:
            tensors["top_ids"] = torch.cat([s.top_ids for s in self._buffer]).to(torch.int32)  # [N, K]
            tensors["top_probs"] = torch.cat([s.top_probs for s in self._buffer]).to(torch.float16)  # [N, K]
        name = f"shard-{len(self.manifest['shards']):05d}.safetensors"
        tmp = self.root / (name + ".tmp")
        save_file(tensors, str(tmp))
        os.replace(tmp, self.root / name)
        self.manifest["shards"].append({"file": name, "tokens": n, "sequences": len(self._buffer)})
        self._buffer = []


@dataclass(frozen=True)
class SequenceRef:
    shard: int
    start: int
    end: int


class StoreReader:
    """The sequences of a store's written shards, read on demand from memory-mapped files."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        path = self.root / MANIFEST
        if not path.is_file():
            raise FileNotFoundError(f"{self.root}: no {MANIFEST} (nothing stored yet)")
        self.manifest = json.loads(path.read_text())
        self._files = [safe_open(str(self.root / s["file"]), framework="pt") for s in self.manifest["shards"]]
        self.sequences: list[SequenceRef] = []
        for i, f in enumerate(self._files):
            offsets = f.get_tensor("offsets").tolist()
            self.sequences += [SequenceRef(i, a, b) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.manifest["shards"])

    def __len__(self) -> int:
        return len(self.sequences)

    def sample(self, i: int, max_len: int | None = None) -> DraftSample:
        """Sequence `i` (its first `max_len` tokens), tokens/labels as int64, features bf16 [T, 3H], and the top-k
        ids (int64) and probabilities (fp32) [T, K] where the store has them."""
        ref = self.sequences[i]
        f, end = self._files[ref.shard], ref.end if max_len is None else min(ref.end, ref.start + max_len)

        def rows(name: str) -> torch.Tensor:
            return f.get_slice(name)[ref.start : end]

        top = (rows("top_ids").long(), rows("top_probs").float()) if self.manifest.get("top_k") else ()
        return DraftSample(rows("tokens").long(), rows("labels").long(), rows("features"), *top)

    def lengths(self) -> list[int]:
        return [r.end - r.start for r in self.sequences]

    def all_labels(self):
        """Each shard's labels [N] (for counting the draft vocabulary without touching features)."""
        for f in self._files:
            yield f.get_tensor("labels").long()
