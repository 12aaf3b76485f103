"""The scripted upstream: HTTP/1.1 by hand over asyncio streams, so that it can misbehave
exactly on cue (stall, reset mid-body, never answer) and report what it saw."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, field

from tests.support.loopback import LoopbackServer, abort_with_reset, parse_head, read_body


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader | None = None
    sequence: int = 0  # how many requests this connection carried before this one


Writer = asyncio.StreamWriter
Handler = Callable[[Request, Writer], Awaitable[None]]


@dataclass
class ScriptedUpstream(LoopbackServer):
    """HTTP/1.1 upstream whose behaviour per path is a coroutine given the raw writer."""

    handlers: dict[str, Handler]
    port: int = 0
    seen: list[Request] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed_connections: int = 0
    open_connections: int = 0
    peak_connections: int = 0

    async def _read_request(self, reader: asyncio.StreamReader) -> Request:
        method, path, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        body = await read_body(reader, headers)
        return Request(method, path, headers, body, reader)

    async def serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        sequence = 0
        try:
            while True:
                try:
                    request = await self._read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                request.sequence, sequence = sequence, sequence + 1
                self.seen.append(request)
                self.arrived.set()
                handler = self.handlers.get(request.path.split("?")[0], not_found)
                await handler(request, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self.closed_connections += 1
            writer.close()


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request, writer: Writer) -> None:
        head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        payload = b"" if request.method == "HEAD" else body
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()

    return handler


not_found = respond(404, b"not found")


async def echo(request: Request, writer: Writer) -> None:
    await respond(200, request.body)(request, writer)


def delayed(seconds: float, then: Handler) -> Handler:
    """Answer after ``seconds``: the upstream's own latency, not a way to wait for anything."""

    async def handler(request: Request, writer: Writer) -> None:
        await asyncio.sleep(seconds)
        await then(request, writer)

    return handler


async def hang(request: Request, writer: Writer) -> None:
    """Never answer; return when the proxy closes the connection (or after 30 s)."""
    assert request.reader is not None
    with suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(request.reader.read(), 30)
    writer.close()


def stale_after_first(*, reset: bool = False) -> Handler:
    """Answer the first request on a connection; when the next one arrives on it, close the
    connection without answering (with a FIN, or with a RST when ``reset``)."""

    async def handler(request: Request, writer: Writer) -> None:
        if request.sequence >= 1:
            if reset:
                abort_with_reset(writer)
            else:
                writer.close()
            return
        await respond(200, b"ok")(request, writer)

    return handler


def send_raw(data: bytes, *, close: bool = True) -> Handler:
    """Answer with exactly these bytes (a response that may be malformed on purpose)."""

    async def handler(request: Request, writer: Writer) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return handler


async def endless_stream(request: Request, writer: Writer) -> None:
    """Chunked body, a chunk every 20 ms, for up to 30 s (until the peer goes away)."""
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(1500):
        writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def reset_mid_body(request: Request, writer: Writer) -> None:
    """Promise 100000 bytes, send 10, then reset the connection."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"y" * 10)
    await writer.drain()
    await asyncio.sleep(0.05)  # the bytes reach the proxy before the RST does
    abort_with_reset(writer)
