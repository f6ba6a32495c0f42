"""The PTQ start-up cache: safetensors + JSON entries (an export directory for quantized weights), written
atomically under unique temp names; a damaged entry is a miss (a warning naming it, then recomputed), a pickle is
never loaded, and a damaged model directory fails start-up in one line naming the file."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from optiserve.engine.cache_store import write_entry
from optiserve.engine.quant import QuantLinear
from optiserve.optimize.calibrate import STATS_JSON, STATS_TENSORS
from optiserve.optimize.ptq_pipeline import QuantRequest, cache_key, prepare_quantized

REQ = QuantRequest("int8", "fp8", calib_samples=2, calib_seq_len=64)
CALIB_KEY_REQ = QuantRequest("none", "none", calib_samples=2, calib_seq_len=64)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path))
    return tmp_path / "ptq"


def entries(engine, cache_dir: Path) -> tuple[Path, Path]:
    """(the quantized-weights entry, the calibration-statistics entry) of `REQ`."""
    calib = f"calib-{cache_key(engine.model_dir, engine.master, CALIB_KEY_REQ)}"
    return cache_dir / cache_key(engine.model_dir, engine.master, REQ), cache_dir / calib


def assert_same_result(a, b) -> None:
    ours = {n: m for n, m in a.model.named_modules() if isinstance(m, QuantLinear)}
    theirs = {n: m for n, m in b.model.named_modules() if isinstance(m, QuantLinear)}
    assert ours.keys() == theirs.keys() and ours
    for name, m in ours.items():
        o = theirs[name]
        for s, t in zip(m.shards, o.shards, strict=True):
            for field, v in vars(s).items():
                w = vars(t)[field]
                assert torch.equal(v, w) and v.dtype == w.dtype if isinstance(v, torch.Tensor) else v == w, name
        assert torch.equal(m.input_scale, o.input_scale) and torch.equal(m.pre_quant_scale, o.pre_quant_scale)
    assert a.kv.name == b.kv.name
    assert all(torch.equal(x, y) for x, y in zip(a.kv.k_scales + a.kv.v_scales, b.kv.k_scales + b.kv.v_scales,
                                                   strict=True))


def test_truncated_entries_are_recomputed(engine, cache_dir, caplog):
    fresh = prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, REQ)
    weights, stats = entries(engine, cache_dir)
    assert_same_result(prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, REQ), fresh)  # a hit
    for f in (weights / "model.safetensors", stats / STATS_TENSORS):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        again = prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, REQ)
    assert_same_result(again, fresh)
    warned = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(weights / "model.safetensors") in warned
    with caplog.at_level(logging.WARNING):  # recomputed and rewritten: the next start reads it
        caplog.clear()
        assert_same_result(prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, REQ), fresh)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(p.name for p in cache_dir.iterdir()) == sorted([weights.name, stats.name])  # no temp left


class PlantedPayload:
    """A pickle that, if ever unpickled, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_a_planted_pickle_is_never_loaded(engine, cache_dir, tmp_path):
    marker = tmp_path / "pickle-ran"
    payload = pickle.dumps(PlantedPayload(marker))
    weights, stats = entries(engine, cache_dir)
    for entry, files in ((weights, ("model.safetensors", "config.json", "hf_quant_config.json")),
                         (stats, (STATS_TENSORS, STATS_JSON))):
        entry.mkdir(parents=True)
        for name in files:
            (entry / name).write_bytes(payload)
        entry.with_suffix(".pt").write_bytes(payload)  # where the old cache kept its pickles
        torch.save(PlantedPayload(marker), entry / "stats.pt")
    result = prepare_quantized(engine.model_dir, engine.master, engine.tokenizer, REQ)
    assert not marker.exists()
    assert any(isinstance(m, QuantLinear) for m in result.model.modules())


def test_two_writers_of_one_key_never_share_a_file(tmp_path):
    """Both writers are mid-write at once; the entry is one writer's, whole, and no temp directory is left."""
    entry, both_writing = tmp_path / "ptq" / "key", threading.Barrier(2)

    def writer(tag: str):
        def write(tmp: Path) -> None:
            with open(tmp / "data", "w") as f:
                f.write(tag * 1000)
                f.flush()
                both_writing.wait(timeout=10)
                f.write(tag * 1000)
        return lambda: write_entry(entry, write)

    threads = [threading.Thread(target=writer(tag)) for tag in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (entry / "data").read_text() in ("a" * 2000, "b" * 2000)
    assert [p.name for p in entry.parent.iterdir()] == ["key"]


def test_a_failed_write_is_a_warning_and_leaves_nothing(tmp_path, caplog):
    entry = tmp_path / "ptq" / "key"

    def write(tmp: Path) -> None:
        (tmp / "part").write_text("half")
        raise OSError(28, "No space left on device")

    with caplog.at_level(logging.WARNING):
        write_entry(entry, write)
    assert str(entry) in caplog.text and "No space left" in caplog.text
    assert list(entry.parent.iterdir()) == []


@pytest.mark.parametrize("damaged", ["model.safetensors", "config.json"])
def test_a_damaged_model_dir_fails_in_one_line(engine, tmp_path, damaged):
    model = tmp_path / "model"
    model.mkdir()
    for f in engine.model_dir.iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy2(f, model / f.name)
    with open(engine.model_dir / "model.safetensors", "rb") as src:  # a truncated copy, or the file whole
        (model / "model.safetensors").write_bytes(src.read(4096 if damaged == "model.safetensors" else None))
    if damaged == "config.json":
        (model / "config.json").write_text((model / "config.json").read_text()[:40])
    run = subprocess.run([sys.executable, "-m", "optiserve.server.cli", "serve", "--model", str(model)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1
    errors = [line for line in run.stderr.splitlines() if "optiserve: error" in line]
    assert len(errors) == 1 and str(model / damaged) in errors[0], run.stderr
    assert "Traceback" not in run.stderr
