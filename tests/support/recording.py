"""An upstream that records the exact bytes of every connection and parses them strictly.

h11 (a strict HTTP/1.1 parser, independent of the proxy's llhttp) is the referee: what the
upstream parsed is what an origin server would have acted on. Each complete request is
answered 200 with ``x-upstream: raw`` so that a client can tell a proxied answer from a
proxy-made one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import h11

from tests.support.loopback import LoopbackServer, in_a_thread


@dataclass
class Seen:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""

    def header(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]


@dataclass
class ConnectionLog:
    raw: bytearray = field(default_factory=bytearray)
    requests: list[Seen] = field(default_factory=list)
    partial: Seen | None = None  # a request whose end never came
    error: str | None = None  # what h11 refused
    closed: bool = False


@dataclass
class RecordingUpstream(LoopbackServer):
    port: int = 0
    connections: list[ConnectionLog] = field(default_factory=list, repr=False)
    arrivals: list[Seen] = field(default_factory=list, repr=False)  # complete, in order

    def received_bytes(self) -> int:
        return sum(len(c.raw) for c in self.connections)

    @property
    def requests(self) -> list[Seen]:
        return [r for c in self.connections for r in c.requests]

    def problems(self) -> list[str]:
        """Anything an origin server would have choked on or acted on half-way."""
        found = []
        for index, conn in enumerate(self.connections):
            if conn.error is not None:
                found.append(f"connection {index}: h11 refused: {conn.error}: {bytes(conn.raw)!r}")
        return found

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log = ConnectionLog()
        self.connections.append(log)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                data = await reader.read(65536)
                if not data and log.partial is not None:
                    return  # aborted mid-request: ``partial`` says how far it got
                log.raw += data
                conn.receive_data(data)
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        break
                    if isinstance(event, h11.Request):
                        log.partial = Seen(event.method, event.target, list(event.headers))
                    elif isinstance(event, h11.Data) and log.partial is not None:
                        log.partial.body += bytes(event.data)
                    elif isinstance(event, h11.EndOfMessage) and log.partial is not None:
                        seen, log.partial = log.partial, None
                        log.requests.append(seen)
                        self.arrivals.append(seen)
                        body = b"%s %s %d" % (seen.method, seen.target, len(seen.body))
                        headers = [("content-length", str(len(body))), ("x-upstream", "raw")]
                        writer.write(conn.send(h11.Response(status_code=200, headers=headers)))
                        writer.write(conn.send(h11.Data(data=body)) or b"")
                        writer.write(conn.send(h11.EndOfMessage()) or b"")
                        await writer.drain()
                        conn.start_next_cycle()
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                if not data:
                    return
        except h11.RemoteProtocolError as exc:
            log.error = str(exc)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            log.closed = True
            writer.close()


@contextmanager
def recording_upstream_thread() -> Iterator[RecordingUpstream]:
    """The same upstream on an event loop of its own, for tests that block."""
    with in_a_thread(RecordingUpstream()) as upstream:
        yield upstream
