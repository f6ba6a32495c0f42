"""`on_own_thread`: one-off compute on a thread that exits (so the engine thread's OpenMP pool stays alone)."""

import threading

import pytest
import torch

from optiserve.engine.threads import on_own_thread


def test_the_work_runs_on_a_thread_that_is_gone_after_and_its_result_or_error_comes_back():
    seen: list[threading.Thread] = []

    def work(a: torch.Tensor, *, times: int) -> torch.Tensor:
        seen.append(threading.current_thread())
        return (a @ a.T) * times  # a parallel region on the worker's own pool

    a = torch.randn(64, 64)
    torch.testing.assert_close(on_own_thread(work, a, times=2), (a @ a.T) * 2)
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()
    with pytest.raises(ValueError, match="bad input"):
        on_own_thread(lambda: (_ for _ in ()).throw(ValueError("bad input")))
