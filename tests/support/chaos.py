"""A chaos upstream for fault-injection tests: a raw asyncio HTTP/1.1 server on 127.0.0.1.

Each fault is chosen by the request path and happens exactly where the path says (before
any response byte, after the headers, after n body bytes), so a test knows which side of
the response headers the proxy saw it. Healthy paths answer with bodies derived from a tag
in the path, so concurrent responses can be checked byte for byte and never be confused
with one another. Connection-level chaos (keep-alive connections closed at random) is
driven by a seeded random, so a run can be replayed.

Paths:

``/ok/<n>/<tag>``          200, Content-Length n, ``payload(tag, n)``
``/chunked/<n>/<tag>``     200, chunked, ``payload(tag, n)`` in random-sized chunks
``/silent``                reads the request, never answers (until the peer hangs up)
``/close``                 closes (FIN) before any response byte
``/garbage``               answers with bytes that are not HTTP, then closes
``/reset/<n>``             headers promise more than n bytes, n bytes, then RST
``/drip/<chunks>/<ms>``    Content-Length chunks * 1 KiB; a chunk at once, then one every ms
``/short/<declared>/<n>``  Content-Length declared, only n bytes, then FIN
``/long/<declared>/<ms>``  Content-Length declared, then more bytes than that: after ms
                           milliseconds a complete second response (``SMUGGLED``); the
                           connection stays open
``/stream``                chunked, 16 KiB chunks as fast as the peer reads, endless
``/upload``                reads the request body, answers with its length
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from contextlib import suppress
from dataclasses import dataclass, field

from tests.support.loopback import LoopbackServer, abort_with_reset, parse_head, read_body

SMUGGLED = b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nSMUGGLED"
GARBAGE = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 this is not HTTP\r\n\r\n"
DRIP_CHUNK = 1024
STREAM_CHUNK = b"s" * 16384


def payload(tag: str, size: int) -> bytes:
    """``size`` bytes that depend on ``tag``: two tags never share a body."""
    block = hashlib.blake2b(tag.encode(), digest_size=64).digest()
    return (block * (size // len(block) + 1))[:size]


@dataclass
class Seen:
    method: str
    path: str
    sequence: int  # requests this connection carried before this one
    body: bytes = b""


@dataclass
class ChaosUpstream(LoopbackServer):
    """The server. ``stale_ratio``: the share of requests arriving on a reused keep-alive
    connection that find it closed by the upstream (FIN or RST, no response byte): the
    stale keep-alive race, as seen from the proxy. ``idle_close_ratio``: the share of
    connections closed (FIN) just after a response, while idle in the proxy's pool."""

    seed: int = 0
    stale_ratio: float = 0.0
    idle_close_ratio: float = 0.0
    port: int = 0
    seen: list[Seen] = field(default_factory=list)
    stale_closes: int = 0
    idle_closes: int = 0
    accepted: int = 0
    open_connections: int = 0
    peak_connections: int = 0
    incomplete_requests: int = 0  # connections that ended mid request (head or body)
    smuggled: int = 0  # ``/long`` excess responses written
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)

    def paths(self, prefix: str = "/") -> list[str]:
        return [s.path for s in self.seen if s.path.startswith(prefix)]

    def times_seen(self, path: str) -> int:
        return sum(1 for s in self.seen if s.path == path)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        try:
            sequence = 0
            while not writer.is_closing():
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.incomplete_requests += 1
                    return
                method, path, headers = parse_head(head)
                if sequence > 0 and self.stale_ratio and self._rng.random() < self.stale_ratio:
                    # Closed as the request arrived: the proxy gets no response byte.
                    self.stale_closes += 1
                    self.seen.append(Seen(method, path, sequence))
                    if self._rng.random() < 0.5:
                        abort_with_reset(writer)
                    else:
                        writer.close()
                    return
                try:
                    body = await read_body(reader, headers)
                except asyncio.IncompleteReadError:
                    self.incomplete_requests += 1
                    return
                self.seen.append(Seen(method, path, sequence, body))
                sequence += 1
                await self._answer(method, path, body, reader, writer)
                if self.idle_close_ratio and self._rng.random() < self.idle_close_ratio:
                    # An idle keep-alive connection dropped by the upstream a moment after
                    # its response: usually noticed in the pool, sometimes crossing the
                    # proxy's next request on it.
                    await asyncio.sleep(self._rng.uniform(0, 0.005))
                    self.idle_closes += 1
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            writer.close()

    async def _answer(
        self,
        method: str,
        path: str,
        body: bytes,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        kind, *args = path.split("?")[0].strip("/").split("/")
        if kind == "ok":
            data = payload(args[1], int(args[0]))
            head = f"HTTP/1.1 200 OK\r\ncontent-length: {len(data)}\r\n\r\n".encode()
            writer.write(head + (b"" if method == "HEAD" else data))
        elif kind == "chunked":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            data = payload(args[1], int(args[0]))
            while data:
                size = self._rng.randint(1, 8192)
                piece, data = data[:size], data[size:]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
        elif kind == "silent":
            with suppress(TimeoutError):
                await asyncio.wait_for(reader.read(), 30)
            writer.close()
        elif kind == "close":
            writer.close()
        elif kind == "garbage":
            writer.write(GARBAGE)
            await writer.drain()
            writer.close()
        elif kind == "reset":
            size = int(args[0])
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (size * 10))
            writer.write(payload("reset", size))
            await writer.drain()
            await asyncio.sleep(0.05)  # the bytes reach the proxy before the RST does
            abort_with_reset(writer)
        elif kind == "drip":
            chunks, delay = int(args[0]), int(args[1]) / 1000
            data = payload("drip", chunks * DRIP_CHUNK)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(data))
            for start in range(0, len(data), DRIP_CHUNK):
                if start:
                    await writer.drain()
                    if await _hung_up_within(reader, delay):
                        return
                writer.write(data[start : start + DRIP_CHUNK])
        elif kind == "short":
            declared, sent = int(args[0]), int(args[1])
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % declared)
            writer.write(payload("short", declared)[:sent])
            await writer.drain()
            writer.close()
        elif kind == "long":
            declared, delay = int(args[0]), int(args[1]) / 1000
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % declared)
            writer.write(payload("long", declared))
            if delay:
                await writer.drain()
                await asyncio.sleep(delay)
            writer.write(SMUGGLED)
            await writer.drain()
            self.smuggled += 1
        elif kind == "stream":
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (len(STREAM_CHUNK), STREAM_CHUNK)
            for _ in range(100_000):  # bounded: 1.6 GB, far more than any test reads
                writer.write(chunk)
                await writer.drain()
        elif kind == "upload":
            answer = str(len(body)).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer))
        else:
            writer.write(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n")
        await writer.drain()


async def _hung_up_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Wait ``seconds``, or less if the peer hangs up meanwhile (True then)."""
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return False
    return True  # EOF; the peer sends nothing else while its response is under way
