"""How a WebSocket session ends: the close codes the relay uses, and each side's end read
from what its library reports (websocket.py acts on them)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.types import Message
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from .session import Closer, SessionResult

GOING_AWAY = 1001
NO_STATUS = 1005  # received: a close frame without a code; never sent as a code
ABNORMAL = 1006  # a side vanished without a close frame; never sent
TOO_BIG = 1009
INTERNAL_ERROR = 1011


@dataclass
class End:
    """How one side ended: the session's result, who ended it, the code it closed with,
    and what to tell the other side."""

    result: SessionResult
    closed_by: Closer
    code: int
    reason: str = ""
    vanished: bool = False


def first_end(tasks: list[asyncio.Task[End]], done: set[asyncio.Task[End]]) -> End:
    for task in tasks:  # in a fixed order, when both ended in one turn
        if task in done:
            return task.result()
    raise AssertionError("no task ended")


def client_end(message: Message) -> End:
    """The client's ``websocket.disconnect``: a close frame (its code and reason, or 1009 when
    uvicorn refused a message too large), or a lost connection (no reason key)."""
    code = message.get("code") or NO_STATUS
    if code == TOO_BIG:
        return End(SessionResult.TOO_LARGE, Closer.CLIENT, TOO_BIG, "message too big")
    vanished = "reason" not in message or code == ABNORMAL
    if vanished:
        return End(SessionResult.CLIENT_CLOSED, Closer.CLIENT, GOING_AWAY, vanished=True)
    return End(SessionResult.CLIENT_CLOSED, Closer.CLIENT, code, message.get("reason") or "")


def upstream_end(closed: ConnectionClosed) -> End:
    rcvd, sent = closed.rcvd, closed.sent
    if sent is not None and sent.code == TOO_BIG and not closed.rcvd_then_sent:
        # The client library refused a message too large and closed with 1009.
        return End(SessionResult.TOO_LARGE, Closer.UPSTREAM, TOO_BIG, "message too big")
    if rcvd is None:
        return End(SessionResult.UPSTREAM_CLOSED, Closer.UPSTREAM, INTERNAL_ERROR, vanished=True)
    return End(SessionResult.UPSTREAM_CLOSED, Closer.UPSTREAM, rcvd.code, rcvd.reason)


async def close_upstream(connection: ClientConnection, code: int, reason: str) -> None:
    close: Callable[..., Awaitable[None]] = connection.close
    with contextlib.suppress(Exception):
        # A code received as none (1005) goes on as none.
        if code == NO_STATUS:
            await close(None)  # websockets sends an empty close frame
        else:
            await close(code, reason)
