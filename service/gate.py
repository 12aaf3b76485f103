"""An admission gate: at most ``capacity`` holders, FIFO waiters, a bounded wait.

Plain asyncio futures rather than anyio primitives: this runs twice per proxied request,
and the fast path (a free slot, nobody waiting) must not touch timers or the task machinery.
Cancellation-safe: a waiter cancelled or timed out just as a slot was handed to it passes
that slot on, so no slot is ever lost.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class GateTimeout(Exception):
    """No slot became free within the timeout."""


class Gate:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, wait_limit: float | None) -> None:
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiters.append(waiter)
        timer = loop.call_later(wait_limit, _expire, waiter) if wait_limit is not None else None
        try:
            await waiter
        except GateTimeout:
            self._discard(waiter)
            raise
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.release()  # handed a slot just as we were cancelled: pass it on
            else:
                self._discard(waiter)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _discard(self, waiter: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)

    def release(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter; in_use is unchanged
                return
        self.in_use -= 1


def _expire(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_exception(GateTimeout())
