"""The one loopback server base under the test upstreams, and the HTTP/1.1 request parsing
the hand-written ones share.

``ScriptedUpstream`` (``scripted``), ``RecordingUpstream`` (``recording``) and
``ChaosUpstream`` (``chaos``) each say how they serve a connection; how they listen on
127.0.0.1, and stop, is here.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Self, TypeVar


class LoopbackServer:
    """An asyncio server on an ephemeral 127.0.0.1 port, one ``serve`` call per connection.

    Subclasses are dataclasses with a ``port: int = 0`` field, set once ``running()``."""

    port: int
    host = "127.0.0.1"  # any loopback address (127.0.0.0/8): several endpoints of one name
    backlog = 1024  # a burst of connections is never refused by the listener itself

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    @asynccontextmanager
    async def running(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Self]:
        """Listening on ``host`` (a loopback address) and ``port`` (0: an ephemeral one)."""
        server = await asyncio.start_server(self.serve, host, port, backlog=self.backlog)
        self.host = host
        self.port = int(server.sockets[0].getsockname()[1])
        try:
            yield self
        finally:
            server.close()
            with suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)

    @asynccontextmanager
    async def also_on(self, host: str) -> AsyncIterator[str]:
        """The running server listening on ``host`` (another loopback address) too, on its
        port: one server behind the endpoints of an upstream. Yields that address's URL."""
        server = await asyncio.start_server(self.serve, host, self.port, backlog=self.backlog)
        try:
            yield f"http://{host}:{self.port}"
        finally:
            server.close()
            with suppress(TimeoutError):
                await asyncio.wait_for(server.wait_closed(), 5)


Server = TypeVar("Server", bound=LoopbackServer)


@contextmanager
def in_a_thread(server: Server) -> Iterator[Server]:
    """``server`` on an event loop of its own, for tests that block."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] | None = None

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        async with server.running():
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    assert ready.wait(10), "upstream did not start"
    try:
        yield server
    finally:
        assert stop is not None
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(10)
        loop.close()


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and headers (names lowercased) of a request head ending in CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body the head announces: Content-Length or chunked, else none."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


def abort_with_reset(writer: asyncio.StreamWriter) -> None:
    """Close the connection with a RST instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()
