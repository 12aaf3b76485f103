"""A real WebSocket upstream on 127.0.0.1 (the ``websockets`` package's server): echo by
default, with paths that refuse, close with a code, vanish or stay silent, and a record of
every handshake that reached it."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http import HTTPStatus

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from tests.support.net import eventually

REFUSAL_BODY = b"no websocket for you\n"


@dataclass
class WsUpstream:
    url: str
    handshakes: list[Request] = field(default_factory=list)
    open: set[ServerConnection] = field(default_factory=set)
    closes: list[tuple[int | None, str | None]] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


def _refusal(path: str) -> Response | None:
    if path.startswith("/refuse"):
        headers = Headers([("Content-Type", "text/plain"), ("X-Why", "refused")])
        return Response(403, HTTPStatus(403).phrase, headers, REFUSAL_BODY)
    return None


@asynccontextmanager
async def ws_upstream(
    max_size: int | None = 64 << 20, tls: ssl.SSLContext | None = None
) -> AsyncIterator[WsUpstream]:
    """Paths: ``/refuse`` answers 403 with a body; ``/ping`` pings the proxy and says
    ``pong received`` once answered, then echoes; ``/close/<code>`` closes at once with that
    code and reason ``bye``; ``/vanish`` drops the TCP connection after its first message;
    ``/big/<n>`` sends one binary message of n bytes, then echoes; ``/silent`` reads and says
    nothing; anything else echoes each message as it came (text as text). With ``tls``: a
    wss:// server, its ``url`` https://."""
    upstream = WsUpstream(url="")

    def process_request(connection: ServerConnection, request: Request) -> Response | None:
        upstream.handshakes.append(request)
        return _refusal(request.path)

    async def handler(connection: ServerConnection) -> None:
        upstream.open.add(connection)
        try:
            path = connection.request.path if connection.request is not None else "/"
            if path.startswith("/close/"):
                await connection.close(int(path.split("/")[2]), "bye")
                return
            if path.startswith("/big/"):
                await connection.send(b"x" * int(path.split("/")[2]))
            if path.startswith("/ping"):
                # A ping of its own: the proxy's client side must answer it.
                pong = await connection.ping(b"are you there")
                await asyncio.wait_for(pong, 5)
                await connection.send("pong received")
            if path.startswith("/vanish"):
                await connection.recv()
                connection.transport.abort()
                return
            async for message in connection:
                if not path.startswith("/silent"):
                    await connection.send(message)
        except Exception:
            pass
        finally:
            rcvd = connection.close_code, connection.close_reason
            await connection.wait_closed()
            upstream.closes.append(
                (connection.close_code, connection.close_reason) if rcvd[0] is None else rcvd
            )
            upstream.open.discard(connection)

    async with serve(
        handler,
        "127.0.0.1",
        0,
        process_request=process_request,
        select_subprotocol=_first_known,
        max_size=max_size,
        compression=None,
        ssl=tls,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        upstream.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        yield upstream


KNOWN_SUBPROTOCOLS = ("chat.v2", "chat.v1")


def _first_known(connection: ServerConnection, offered: list[str]) -> str | None:
    for name in KNOWN_SUBPROTOCOLS:
        if name in offered:
            return name
    return None


async def settled(upstream: WsUpstream, within: float = 5.0) -> None:
    """Wait until no session is open at the upstream."""
    await eventually(lambda: not upstream.open, within)
