"""The raw-wire client: exact request bytes on a connection of their own, responses read
and parsed by hand, so that a test sees what the proxy put on the wire."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from tests.support.net import eventually

Response = tuple[int, dict[str, str], bytes]
"""Status, headers (names lowercased) and body."""

SENTINEL = b"GET /sentinel HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"


def address(url: str) -> tuple[str, int]:
    """Host and port of ``http://host:port[/path]``."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, url
    return parts.hostname, parts.port


async def connect(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A fresh connection to the server of ``url``."""
    return await asyncio.open_connection(*address(url))


def refused(url: str) -> bool:
    """Nothing accepts connections at the server of ``url`` (its listener is closed)."""
    with socket.socket() as sock:
        return sock.connect_ex(address(url)) != 0


def head(*lines: str, body: bytes = b"") -> bytes:
    """A request (or response) head from its lines, then ``body`` as it is."""
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*chunks: bytes) -> bytes:
    """A well-formed chunked body of these chunks."""
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"


def parse_response_head(data: bytes) -> tuple[int, dict[str, str]]:
    lines = data.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def read_response(reader: asyncio.StreamReader) -> Response | None:
    """One response framed by Content-Length (or without a body), or None at EOF."""
    try:
        data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    status, headers = parse_response_head(data)
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def exchange(url: str, data: bytes, *, sentinel: bool = True) -> list[Response]:
    """Send ``data`` on one connection and collect what comes back. If the connection stays
    open after the first response, a sentinel request follows on it: anything the proxy
    parsed out of ``data`` is answered before it, so nothing can still be on its way."""
    reader, writer = await connect(url)
    responses: list[Response] = []
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(10):
            first = await read_response(reader)
            if first is None:
                return responses
            responses.append(first)
            if first[1].get("connection") != "close" and sentinel:
                writer.write(SENTINEL)
                await writer.drain()
            while (response := await read_response(reader)) is not None:
                responses.append(response)
            assert await reader.read() == b""
    finally:
        writer.close()
    return responses


async def raw_exchange(url: str, request: bytes, within: float = 10.0) -> bytes:
    """Send raw request bytes on a fresh connection and read until the server closes."""
    reader, writer = await connect(url)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()


async def raw_request(
    url: str, path: str, *, read_bytes: int = 0, hang_up_when: Callable[[], bool] | None = None
) -> None:
    """Send a GET, read ``read_bytes`` of the response (or wait until ``hang_up_when()``),
    then hang up."""
    reader, writer = await connect(url)
    writer.write(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
    await writer.drain()
    if read_bytes:
        await reader.readexactly(read_bytes)
    if hang_up_when is not None:
        await eventually(hang_up_when)
    writer.transport.abort()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    seconds: float


class Unanswered(ConnectionError):
    """The connection was reset or closed before a single byte of response."""


async def read_all(reader: asyncio.StreamReader) -> bytes:
    received = b""
    try:
        while chunk := await reader.read(65536):
            received += chunk
    except ConnectionResetError:
        if not received:
            raise Unanswered("reset") from None
        raise ConnectionError(f"reset after {len(received)} bytes") from None
    if not received:
        raise Unanswered("closed")
    return received


async def fetch(url: str, path: str, *, body: bytes | None = None, within: float = 60) -> Reply:
    """One request on a fresh connection (``connection: close``); read until the server
    closes. Raises on a connection that ends without a complete response."""
    started = time.monotonic()
    reader, writer = await connect(url)
    try:
        method = "POST" if body is not None else "GET"
        lines = [f"{method} {path} HTTP/1.1", "host: test", "connection: close"]
        if body is not None:
            lines.append(f"content-length: {len(body)}")
        writer.write(head(*lines, body=body or b""))
        await writer.drain()
        raw = await asyncio.wait_for(read_all(reader), within)
    finally:
        writer.close()
    head_bytes, sep, payload = raw.partition(b"\r\n\r\n")
    if not sep:
        raise ConnectionError(f"no complete response head: {raw[:80]!r}")
    status, headers = parse_response_head(head_bytes)
    length = int(headers.get("content-length", -1))
    if length != len(payload):
        raise ConnectionError(f"truncated response: {len(payload)} of {length} bytes")
    return Reply(status, headers, payload, time.monotonic() - started)
