"""Calibration runs on a private forward: requests served meanwhile by the same model leave no trace in the
statistics, so a live swap calibrates exactly as start-up does."""

from __future__ import annotations

import threading
from dataclasses import fields

import torch

from optiserve.engine.runner import ModelRunner
from optiserve.optimize.calibrate import CalibStats, InputStats
from optiserve.optimize.ptq_pipeline import QuantRequest, calibration_stats

REQ = QuantRequest(calib_samples=2, calib_seq_len=64)
TRAFFIC = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13]  # an odd row count, as served requests bring


def assert_equal_stats(a: CalibStats, b: CalibStats) -> None:
    assert a.linears.keys() == b.linears.keys()
    for name, x in a.linears.items():
        y = b.linears[name]
        for f in fields(InputStats):
            u, v = getattr(x, f.name), getattr(y, f.name)
            if f.name == "sample":
                assert len(u) == len(v) and all(torch.equal(s, t) for s, t in zip(u, v, strict=True)), name
            elif isinstance(u, torch.Tensor):
                assert torch.equal(u, v), (name, f.name)
            else:
                assert u == v, (name, f.name)
    for per_layer in ("k_amax", "v_amax", "k_mean"):
        assert all(torch.equal(s, t) for s, t in zip(getattr(a, per_layer), getattr(b, per_layer), strict=True))


def test_swap_statistics_equal_startup_statistics(engine, tmp_path, monkeypatch):
    """A swap calibrates while the engine thread runs the served model's forward; its statistics (as computed, and
    as read back from the cache) equal those of a start-up calibration with the same arguments, exactly."""
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path / "startup"))
    startup = calibration_stats(engine.model_dir, engine.master, engine.tokenizer, REQ)
    monkeypatch.setenv("OPTISERVE_CACHE", str(tmp_path / "swap"))
    served = ModelRunner(engine.master, 1, 64, engine.master.embed.weight.dtype)
    stop, forwards = threading.Event(), []

    def serve_traffic():
        while not stop.is_set():
            served.prefill(0, TRAFFIC)
            forwards.append(1)

    thread = threading.Thread(target=serve_traffic)
    thread.start()
    try:
        while not forwards:  # traffic is flowing before calibration starts
            stop.wait(0.01)
        swap = calibration_stats(engine.model_dir, engine.master, engine.tokenizer, REQ)
    finally:
        stop.set()
        thread.join()
    assert len(forwards) > 1
    assert all(s.rows == REQ.calib_samples * REQ.calib_seq_len for s in swap.linears.values())
    assert_equal_stats(swap, startup)
    assert_equal_stats(calibration_stats(engine.model_dir, engine.master, engine.tokenizer, REQ), startup)  # cached
