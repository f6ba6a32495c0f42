"""Async helpers: merge several request streams, and collect results while watching for a client disconnect."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import TypeVar

from fastapi import Request as HttpRequest

T = TypeVar("T")
_DONE = object()


async def merge_streams(streams: list[AsyncGenerator[T, None]]) -> AsyncIterator[tuple[int, T]]:
    """Yield (stream index, item) from all streams as items arrive. Closing this closes every stream."""
    if len(streams) == 1:  # read in place: no task and queue between the stream and its reader
        try:
            async for item in streams[0]:
                yield 0, item
        finally:
            await streams[0].aclose()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                await queue.put((i, item))
            await queue.put((i, _DONE))
        except BaseException as e:  # hand errors (and cancellation of a stream) to the consumer
            await queue.put((i, e))
            raise

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()  # each stream's own `finally` aborts its engine request
        await asyncio.gather(*tasks, return_exceptions=True)


async def collect_until_disconnect(raw: HttpRequest, streams: list[AsyncGenerator[T, None]],
                                   poll_s: float) -> list[list[T]]:
    """All items of each stream; if the client disconnects first, cancel (which frees the engine slots)."""
    results: list[list[T]] = [[] for _ in streams]

    async def collect() -> None:
        async for i, item in merge_streams(streams):
            results[i].append(item)

    task = asyncio.create_task(collect())
    while not task.done():
        await asyncio.wait([task], timeout=poll_s)
        if not task.done() and await raw.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            raise asyncio.CancelledError("client disconnected")
    task.result()
    return results
