"""The engine's unquantized weights are memory-mapped from the layout cache (engine/weights.py `mapped_tensors`):
file-backed pages, the same tensors as a plain load, private (writes never reach the file), rebuilt if damaged."""

from __future__ import annotations

from pathlib import Path

import torch

from optiserve.engine.weights import LAYOUT_FILE, layout_cache_dir, layout_key, load_model


def file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process mapped from `path` (/proc/self/maps)."""
    spans = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == str(path.resolve()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            spans.append((lo, hi))
    return spans


def mapped_from(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    start = t.data_ptr()
    return any(lo <= start and start + t.nbytes <= hi for lo, hi in spans)


def test_engine_weights_are_mapped_from_the_layout_cache(engine):
    spans = file_mappings(layout_cache_dir() / layout_key(engine.model_dir, torch.float32) / LAYOUT_FILE)
    assert spans, "the layout cache file is not mapped"
    tensors = engine.master.state_dict()
    unmapped = [name for name, t in tensors.items() if t.nbytes > 4096 and not mapped_from(t, spans)]
    assert not unmapped, unmapped[:5]


def test_mapped_weights_equal_a_plain_load_stay_private_and_rebuild_when_damaged(engine, tmp_path, monkeypatch):
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path))
    plain = load_model(engine.model_dir, 64, torch.float32).state_dict()
    first = load_model(engine.model_dir, 64, torch.float32, mapped=True).state_dict()
    assert plain.keys() == first.keys() and all(torch.equal(plain[k], first[k]) for k in plain)

    first["embed.weight"].add_(1.0)  # copy-on-write: the file keeps the original values
    again = load_model(engine.model_dir, 64, torch.float32, mapped=True).state_dict()
    assert torch.equal(again["embed.weight"], plain["embed.weight"])

    del first, again  # unmap before damaging the file: a truncated mapping faults when read
    entry = layout_cache_dir() / layout_key(engine.model_dir, torch.float32)
    data = (entry / LAYOUT_FILE).read_bytes()
    (entry / LAYOUT_FILE).write_bytes(data[: len(data) // 2])
    rebuilt = load_model(engine.model_dir, 64, torch.float32, mapped=True).state_dict()
    assert all(torch.equal(plain[k], rebuilt[k]) for k in plain)
    assert (entry / LAYOUT_FILE).stat().st_size == len(data)
