"""PTQ through the HTTP API: start-up quantization (cached), every format serves, live swaps lose nothing."""

import asyncio
import time

import httpx
import pytest

from tests.conftest import ServerProcess

MODEL = "SmolLM2-135M-Instruct"
TOKEN = "admin-token"
CALIB = ("--calib-samples", "4", "--calib-seq-len", "128")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FORMATS = [("fp8", "fp8"), ("nvfp4", "nvfp4"), ("nvfp4-w4a16", "none"), ("int8", "none"), ("int4", "fp8"),
           ("int4-w4a8", "nvfp4")]


def chat(url: str, content: str = "What is the capital of France?", max_tokens: int = 16) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


@pytest.fixture(scope="module")
def quant_server(tmp_path_factory):
    proc = ServerProcess(tmp_path_factory.mktemp("quant"), "--max-batch", "8", "--admin-token", TOKEN,
                         "--quant", "nvfp4", "--kv-cache", "fp8", *CALIB)
    yield proc
    proc.stop()


def swap(url: str, quant: str, kv: str) -> httpx.Response:
    return httpx.post(f"{url}/admin/quantization", json={"quant": quant, "kv_cache": kv}, headers=AUTH, timeout=600)


def test_startup_quantization_serves_and_reports(quant_server):
    report = httpx.get(f"{quant_server.url}/admin/quantization", headers=AUTH).json()
    assert (report["quant"], report["kv_cache"]) == ("nvfp4", "fp8")
    assert report["linear_packed_bytes"] <= 0.30 * report["linear_bf16_bytes"]
    assert report["kv_bytes_per_token"] == report["resident_kv_bytes_per_token"]  # the pools hold FP8 bytes
    r = chat(quant_server.url)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]
    metrics = httpx.get(f"{quant_server.url}/metrics").text
    assert 'weight_format="nvfp4"' in metrics and 'kv_cache_format="fp8"' in metrics


def test_second_start_skips_calibration_and_no_swap_refuses_swaps(tmp_path, quant_server):
    start = time.monotonic()
    again = ServerProcess(tmp_path, "--max-batch", "2", "--quant", "nvfp4", "--kv-cache", "fp8", *CALIB,
                          "--log-level", "info", "--no-swap", "--admin-token", TOKEN)
    try:
        assert chat(again.url).status_code == 200
        assert httpx.get(f"{again.url}/admin/quantization", headers=AUTH).json()["swappable"] is False
        r = swap(again.url, "int8", "none")
        assert r.status_code == 409 and "--no-swap" in r.json()["error"]["message"], r.text
        assert chat(again.url).status_code == 200
    finally:
        again.stop()
    log = again.log.read_text()
    assert "loading calibrated nvfp4" in log and "calibrating on" not in log, log[-1500:]
    print(f"cached start-up + one request: {time.monotonic() - start:.1f}s")


@pytest.mark.parametrize(("quant", "kv"), FORMATS)
def test_every_format_serves_after_a_live_swap(quant_server, quant, kv):
    r = swap(quant_server.url, quant, kv)
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["quant"], body["kv_cache"]) == (quant, kv) and body["swap_seconds"] > 0
    probe = body["last_quality_probe"]
    assert probe["kl_divergence"] >= 0 and 0 < probe["top1_agreement"] <= 1
    r = chat(quant_server.url)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"]


def test_unknown_format_is_400_and_keeps_the_active_one(quant_server):
    before = httpx.get(f"{quant_server.url}/admin/quantization", headers=AUTH).json()
    assert swap(quant_server.url, "fp3", "none").status_code == 400
    assert swap(quant_server.url, "fp8", "int2").status_code == 400
    after = httpx.get(f"{quant_server.url}/admin/quantization", headers=AUTH).json()
    assert (before["quant"], before["kv_cache"]) == (after["quant"], after["kv_cache"])


def test_swaps_under_load_lose_no_request(quant_server):
    """16 requests in flight (streaming and not) across two swaps: every one completes with 200."""
    url = quant_server.url

    async def run() -> tuple[list[int], list[int]]:
        async with httpx.AsyncClient(base_url=url, timeout=600) as client:
            async def request(i: int) -> int:
                body = {"model": MODEL, "messages": [{"role": "user", "content": f"Count to {i + 5}."}],
                        "max_tokens": 48, "ignore_eos": True, "stream": i % 2 == 0}
                if not body["stream"]:
                    r = await client.post("/v1/chat/completions", json=body)
                    return r.status_code if r.json()["choices"][0]["finish_reason"] == "length" else -1
                async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                    lines = [line async for line in r.aiter_lines() if line]
                    return r.status_code if lines[-1] == "data: [DONE]" else -1

            async def swaps() -> list[int]:
                codes = []
                for quant, kv in (("int8", "fp8"), ("fp8", "none")):
                    await asyncio.sleep(1.0)
                    r = await client.post("/admin/quantization", json={"quant": quant, "kv_cache": kv},
                                          headers=AUTH)
                    codes.append(r.status_code)
                return codes

            results = await asyncio.gather(swaps(), *(request(i) for i in range(16)))
            return results[0], list(results[1:])

    swap_codes, request_codes = asyncio.run(run())
    assert swap_codes == [200, 200]
    assert request_codes == [200] * 16
