"""Time limits on a client connection that is not in a request.

uvicorn closes a kept-alive connection that stays silent for ``timeout_keep_alive``, but
starts that timer only after a response: a connection that never sends a byte stays open
for good, and so does one that sends part of a request head and then nothing (slowloris).
Each holds a descriptor and memory; a few thousand exhaust the process.

* A new connection gets the same idle timeout as a kept-alive one
  (``server.keepalive_timeout_seconds``): a client that connects ahead of its first
  request, as load balancers do, is treated as one between requests.
* From a request's first byte its head (request line and header fields) must arrive within
  ``server.request_head_timeout_seconds`` (nginx's ``client_header_timeout``, HAProxy's
  ``timeout http-request``); otherwise it is answered 408 and the connection closes.

One timer per connection, re-armed only when it fires: a request costs a clock read.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from ..errors import Reason
from .guard import Guard
from .head_checks import Rejection


class HeadTimeout(Guard):
    """The timers, on the guard whose refusal answers a late head."""

    head_timeout: ClassVar[float | None] = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_deadline: float | None = None  # while a head is being read
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's own idle timer, cancelled by the first byte as after a response.
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        limit = self.head_timeout
        if limit is not None:
            self._head_deadline = deadline = self.loop.time() + limit
            if self._head_timer is None:
                self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)

    def on_headers_complete(self) -> None:
        self._head_deadline = None
        super().on_headers_complete()

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None or self.transport.is_closing():
            return  # no head being read: the next one arms it again
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            # A pipelined head: reading is paused until the response before it is sent.
            deadline = self._head_deadline = self.loop.time() + (self.head_timeout or 0.0)
        if self.loop.time() < deadline:
            # A later request's head, or one that waits its turn: its own deadline.
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._head_deadline = None
        self._refuse(Rejection(Reason.REQUEST_TIMEOUT))
