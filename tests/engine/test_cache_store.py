"""The on-disk cache stays bounded: after each write the least recently used layout and PTQ entries go until the
rest fit in OPTISERVE_CACHE_MAX_GB; a read marks an entry used; the entry just written and the converted model are
kept. Two first starts at once on an empty cache both get the converted default model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from optiserve.engine.cache_store import read_entry, write_entry
from optiserve.engine.weights import CONVERTED_MARKER, DEFAULT_MODEL_NAME

MB = 2**20


@pytest.fixture
def root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("OPTISERVE_CACHE_MAX_GB", str(3.5 * MB / 2**30))  # room for three 1 MB entries
    return tmp_path


def write_mb(path: Path, age_s: float) -> None:
    """A 1 MB entry at `path`, last used `age_s` seconds ago."""
    write_entry(path, lambda tmp: (tmp / "blob").write_bytes(os.urandom(MB)))
    stamp = path.stat().st_mtime - age_s
    os.utime(path, (stamp, stamp))


def test_least_recently_used_entries_are_evicted_first(root):
    for i, kind in enumerate(("layouts", "ptq", "layouts")):
        write_mb(root / kind / f"old{i}", age_s=100 - i)  # old0 is the least recent
    model = root / "models" / "m"
    model.mkdir(parents=True)
    (model / "weights").write_bytes(os.urandom(4 * MB))  # not an evictable kind: never counted, never removed
    write_mb(root / "ptq" / "new", age_s=0)
    assert not (root / "layouts" / "old0").exists()
    assert all((root / p).is_dir() for p in ("ptq/old1", "layouts/old2", "ptq/new", "models/m"))


def test_a_read_marks_the_entry_used(root):
    for i in range(3):
        write_mb(root / "layouts" / f"e{i}", age_s=100 - i)
    assert read_entry(root / "layouts" / "e0", lambda p: (p / "blob").stat().st_size) == MB
    write_mb(root / "layouts" / "new", age_s=0)
    assert (root / "layouts" / "e0").is_dir() and not (root / "layouts" / "e1").exists()


def test_the_entry_just_written_is_kept_even_alone_over_the_limit(root, monkeypatch):
    monkeypatch.setenv("OPTISERVE_CACHE_MAX_GB", "0")
    write_mb(root / "ptq" / "a", age_s=10)
    write_mb(root / "ptq" / "b", age_s=0)
    assert not (root / "ptq" / "a").exists() and (root / "ptq" / "b" / "blob").stat().st_size == MB


def test_two_first_starts_at_once_both_get_the_converted_model(tmp_path):
    env = {**os.environ, "OPTISERVE_CACHE": str(tmp_path)}
    code = "from optiserve.engine.weights import resolve_model_dir; print(resolve_model_dir('default'))"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    model = tmp_path / "models" / DEFAULT_MODEL_NAME
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in results]
    assert [out.strip() for out, _ in results] == [str(model)] * 2
    assert (model / CONVERTED_MARKER).is_file() and (model / "model.safetensors").stat().st_size > 100 * MB
    assert not [p.name for p in model.parent.iterdir() if p.name.startswith(".")]  # no temp directory left behind
