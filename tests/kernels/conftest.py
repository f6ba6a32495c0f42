"""Run the Triton kernels on CPU through Triton's interpreter.

Triton picks interpreter or compiler when a function is decorated with `@triton.jit`, i.e. when a module is imported,
both for our kernels and for Triton's own `tl.max` & co. So TRITON_INTERPRET=1 must be set before triton is first
imported; test modules import it at collection, after this file. The variable is then put back, so other test folders
(and the servers they start) do not inherit it; an autouse fixture sets it again around each kernel test, because
Triton also reads it while a kernel runs. If triton was imported earlier without it (by the root conftest or something
it imports), it cannot be switched any more (re-importing triton's C extension aborts): the kernel tests then fail
with that explanation instead of breaking the whole session.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_PREVIOUS = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
try:
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from optiserve.kernels import common, nvfp4

    SETUP_ERROR = None
    if not (isinstance(tl.max, InterpretedFunction) and common.is_interpreted(nvfp4._nvfp4_quantize_kernel)):
        SETUP_ERROR = ("triton was imported before tests/kernels/conftest.py without TRITON_INTERPRET=1, so "
                       "@triton.jit already chose the compiler; keep triton (and optiserve.kernels) out of what "
                       "tests/conftest.py imports, or run pytest with TRITON_INTERPRET=1 in the environment")
finally:
    if _PREVIOUS is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = _PREVIOUS


@pytest.fixture(autouse=True)
def _triton_interpret(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep TRITON_INTERPRET=1 while a kernel test runs."""
    if SETUP_ERROR:
        pytest.fail(SETUP_ERROR)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    yield
