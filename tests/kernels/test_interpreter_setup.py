"""The conftest's interpreter switch: kernels run interpreted, no env var leaks, a too-late switch is reported."""

from __future__ import annotations

import os
import subprocess
import sys

from optiserve.kernels import common, fp8, gemm, int4, int8, nvfp4

SCRIPT = """
import os
os.environ.pop("TRITON_INTERPRET", None)
if {early}:
    import triton  # as if the root conftest had imported it
import tests.kernels.conftest as c
assert "TRITON_INTERPRET" not in os.environ
print("error" if c.SETUP_ERROR else "ok")
"""


def _run(early: bool) -> str:
    env = {key: v for key, v in os.environ.items() if key != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(early=early)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.strip()


def test_kernels_are_interpreted_and_env_is_set_during_tests() -> None:
    kernels = (nvfp4._nvfp4_quantize_kernel, fp8._fp8_quantize_kernel, int8._int8_quantize_kernel,
               int4._int4_dequantize_kernel, gemm._nvfp4_gemm_kernel)
    assert all(common.is_interpreted(k) for k in kernels)
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_conftest_restores_env_and_reports_a_late_switch() -> None:
    assert _run(early=False) == "ok"
    assert _run(early=True) == "error"
