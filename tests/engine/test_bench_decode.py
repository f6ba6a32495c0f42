"""`bench decode`: every side timed on the same prompts gives tok/s, GB/s and resident bytes in one JSON; the
llama.cpp side runs where llama-cpp-python is installed (an optional extra)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from optiserve.engine.bench import DecodeBench, bench_decode
from optiserve.engine.weights import default_gguf_path

SIDE_KEYS = {"tok_s", "ms_per_step", "gb_s", "step_weight_bytes", "resident_bytes"}


def test_engine_and_hf_sides_with_a_low_precision_head(tmp_path):
    out = tmp_path / "decode.json"
    result = bench_decode(DecodeBench(tokens=4, rounds=1, lm_head_dtype="int8", label={"quant": "none"}), str(out))
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["lm_head_dtype"] == "int8" and result["quant"] == "none"
    for side in ("ours", "hf"):
        assert result[side].keys() >= SIDE_KEYS and result[side]["tok_s"] > 0 and result[side]["steps"] >= 2
    head_int8 = 49152 * 576  # HF holds the tied matrix once; we add an int8 head (and its per-row scales) beside it
    assert result["ours"]["resident_bytes"] - result["hf"]["resident_bytes"] == pytest.approx(head_int8, rel=0.02)
    assert set(result["speedup"]) == {"hf"}


def test_compare_is_refused_where_it_cannot_run():
    with pytest.raises(ValueError, match="batch 1"):
        DecodeBench(batch=2, compare="llama-cpp")
    with pytest.raises(ValueError, match="llama-cpp"):
        DecodeBench(compare="vllm")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (optional extra: pip install 'optiserve[compare]')")
def test_llama_cpp_side_on_the_default_gguf():
    result = bench_decode(DecodeBench(tokens=4, rounds=1, compare="llama-cpp"))
    side = result["llama_cpp"]
    assert side.keys() >= SIDE_KEYS and side["tok_s"] > 0 and side["steps"] >= 2
    assert side["gguf"] == default_gguf_path().name
    assert 0.8 < side["resident_bytes"] / default_gguf_path().stat().st_size <= 1.0  # the Q4_1 tensors, as mapped
    assert set(result["speedup"]) == {"hf", "llama_cpp"}


def test_other_formats_of_ours_in_the_same_run(tmp_path, capsys):
    """`--also-quant`: each format is its own side of our engine, timed in the same alternating rounds."""
    from optiserve.server.cli.main import main

    out = tmp_path / "decode.json"
    main(["bench", "decode", "--quant", "int4", "--also-quant", "none,nvfp4", "--tokens", "4", "--rounds", "1",
          "--calib-samples", "2", "--calib-seq-len", "32", "--json", str(out)])
    result = json.loads(out.read_text())
    assert set(result["speedup"]) == {"ours_none", "ours_nvfp4", "hf"}
    for side in ("ours", "ours_none", "ours_nvfp4"):
        assert result[side].keys() >= SIDE_KEYS and result[side]["tok_s"] > 0
    # the formats' own bytes: 4-bit linears hold far less than fp32 ones
    assert result["ours"]["resident_bytes"] < 0.6 * result["ours_none"]["resident_bytes"]
    assert "ours_nvfp4" in capsys.readouterr().out
