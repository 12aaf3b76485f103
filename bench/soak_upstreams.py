"""The upstreams the soak serves itself, on 127.0.0.1: healthy, slow/streaming, faulty.

Raw asyncio HTTP/1.1, so every fault is exact: a reset is an RST (SO_LINGER 0), a hang holds
the connection until Relay's read timeout closes it.

Standalone on purpose, like every server in ``bench/``: no import from ``service/`` or
``tests/``, so the soak runs against any revision of Relay. The test servers live in
``tests/support/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
from collections.abc import Awaitable, Callable
from typing import Any

MIB = 1 << 20
BODY_1K = bytes(range(256)) * 4
CHUNK = b"s" * 1024
STREAM_CHUNKS = 32


async def read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, target, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                return body
            body += chunk[:-2]
    return body


def response(status: int, body: bytes) -> bytes:
    return b"HTTP/1.1 %d X\r\ncontent-length: %d\r\n\r\n%s" % (status, len(body), body)


def reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00" * 2)
    writer.transport.abort()


Handler = Callable[
    [str, str, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]
]  # returns False when the connection must not be reused


async def healthy(
    method: str, target: str, body: bytes, _: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    w.write(response(200, body if method == "POST" else BODY_1K))
    await w.drain()
    return True


async def slow(
    method: str, target: str, body: bytes, _: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    if target.startswith("/slow/stream"):
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(STREAM_CHUNKS):
            w.write(b"400\r\n" + CHUNK + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.01)
        w.write(b"0\r\n\r\n")
    else:
        await asyncio.sleep(random.uniform(0.02, 0.2))
        w.write(response(200, BODY_1K))
    await w.drain()
    return True


async def faulty(
    method: str, target: str, body: bytes, r: asyncio.StreamReader, w: asyncio.StreamWriter
) -> bool:
    fault = random.choice(("ok", "ok", "reset", "reset_mid_body", "hang"))
    if fault == "ok":
        return await healthy(method, target, body, r, w)
    if fault == "reset":
        reset(w)
    elif fault == "reset_mid_body":
        w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + CHUNK)
        await w.drain()
        await asyncio.sleep(0.01)
        reset(w)
    else:  # hang: until Relay's read timeout closes the connection (bounded anyway)
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(r.read(), 10)
    return False


def serve(handler: Handler) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Any]:
    async def connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                method, target, headers = await read_head(reader)
                body = await read_body(reader, headers)
                if not await handler(method, target, body, reader, writer):
                    return
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    return connection
