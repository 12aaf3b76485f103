"""An admission gate: at most ``capacity`` holders, FIFO waiters, a bounded wait.

The queue of waiters is bounded too (``max_waiting``): under overload a request that would
only join a long queue is turned away at once, so excess load costs a fast rejection
instead of memory and a wait that ends in a timeout anyway.

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


class GateFull(GateTimeout):
    """Every slot is taken and ``max_waiting`` requests already wait: refused without waiting.

    A ``GateTimeout`` (a wait limit of zero) so that callers answer both alike.
    """


class Gate:
    def __init__(self, capacity: int, max_waiting: int | None = None) -> None:
        self.capacity = capacity
        self.max_waiting = max_waiting  # None: unbounded
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, wait_limit: float | None) -> None:
        if self.in_use < self.capacity and not self._waiters:
            self.in_use += 1
            return
        if self.max_waiting is not None and len(self._waiters) >= self.max_waiting:
            raise GateFull()
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
