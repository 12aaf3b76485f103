"""The client's side of one proxied request: its body as it arrives, then a watch for the
client hanging up (ASGI allows one reader of ``receive`` at a time)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from starlette.types import Receive

from .errors import BodyTooLarge
from .exchange import Exchange, Side


class ClientDisconnected(Exception):
    """The downstream client went away while its request body was being read."""


class ClientChannel:
    """Owns ``receive`` for one request: the body reader first, then a disconnect watcher.

    ASGI allows one reader at a time, so the watcher only starts reading once the body is
    finished; until then the body reader is the one that sees ``http.disconnect``.
    """

    def __init__(self, receive: Receive, exchange: Exchange, max_body: int = 0) -> None:
        self._receive = receive
        self._exchange = exchange
        self._max_body = max_body  # 0: unlimited
        self.gone = False
        self._body_done = asyncio.Event()

    def no_body(self) -> None:
        self._body_done.set()

    async def body(self) -> AsyncIterator[bytes]:
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._lost()
                    raise ClientDisconnected("client disconnected during the request body")
                chunk: bytes = message.get("body", b"")
                if chunk:
                    size = self._exchange.request_bytes + len(chunk)
                    if self._max_body and size > self._max_body:
                        raise BodyTooLarge("request body exceeds limits.max_body_bytes")
                    self._exchange.request_bytes = size
                    yield chunk
                if not message.get("more_body", False):
                    return
        finally:
            self._body_done.set()

    async def watch(self, on_gone: Callable[[], None]) -> None:
        await self._body_done.wait()
        if self.gone:
            # The body reader saw the client go and raised ClientDisconnected, which already
            # ends the exchange. Cancelling now would land in the transport's cleanup of that
            # error: httpcore's shielded close does not survive an asyncio cancellation and
            # its connection would stay checked out of its pool for good.
            return
        while not self.gone:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._lost()
        on_gone()

    def _lost(self) -> None:
        self.gone = True
        self._exchange.disconnected(Side.CLIENT)
