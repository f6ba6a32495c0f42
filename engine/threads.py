"""One-off compute (start-up, format swaps, benchmarks' set-up) runs on a thread that exits when it is done.

libgomp, the OpenMP runtime of torch's CPU build and of our kernels, keeps a pool of worker threads for each
thread that opens a parallel region, for as long as that thread lives. Once it manages more threads than the
process has CPUs, every pool stops spinning between regions and wakes its workers through the kernel instead, and
an engine step opens a parallel region per kernel call (hundreds). So the engine thread's pool must be the only one
that stays: work done anywhere else goes through `on_own_thread`, and its pool leaves with the thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def on_own_thread(fn: Callable[..., T], *args, **kwargs) -> T:
    """`fn(*args, **kwargs)` on a new thread, waited for: its result, or its exception raised here."""
    result: list[T] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller, whatever it is
            error.append(e)

    thread = threading.Thread(target=run, name=f"optiserve-{getattr(fn, '__name__', 'work')}", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]
