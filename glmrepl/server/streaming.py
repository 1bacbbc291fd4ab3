"""Carry a Reply's text deltas from its thread into the event loop.

A Reply is iterated in one thread (the engine's contract): ``stream_deltas``
hands it at once to a thread of the server's pool, which iterates it and
passes every delta to the loop, and closes it at the end. When the consumer
goes away (the client disconnected, the task was cancelled) the loop only
calls ``cancel``: the thread sees the generation stop within one token, ends
the iteration and gives the model lease back, so nothing is left behind and
the next reply starts at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from typing import Any

from ..engine import ReplyHandle

_END = object()


def stream_deltas(reply: ReplyHandle, executor: Executor) -> AsyncIterator[str]:
    """Start generating now; the returned iterator yields the text deltas.

    From this call on the pool's thread owns the Reply (it closes it); the
    caller may only ``cancel`` it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def hand_over(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is closed (server shutting down): nobody is listening
            reply.cancel()

    def pump() -> None:
        try:
            for delta in reply:
                hand_over(delta)
            hand_over(_END)
        except BaseException as error:  # handed to the request, which words it for the client
            hand_over(error)
        finally:
            reply.close()

    try:
        executor.submit(pump)
    except RuntimeError:  # the pool is shut down
        reply.close()
        raise
    return _read(queue, reply)


async def _read(queue: asyncio.Queue, reply: ReplyHandle) -> AsyncIterator[str]:
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        reply.cancel()  # no-op when it ended by itself
