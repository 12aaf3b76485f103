"""A tiny raw-asyncio HTTP/1.1 upstream for the leak benchmark (bench only, loopback).

    python bench/upstream.py --port PORT [--delay 0.2] [--every 0] [--host 127.0.0.1]

``GET /slow`` answers ``ok`` after ``--delay`` seconds, any other path after ``--every``
seconds (at once by default). Keep-alive,
no request bodies. ``GET /stats`` answers JSON counters kept by the server itself: open
connections, requests in flight, the most ever in flight at once, requests answered.
``GET /stats?reset`` also resets the high-water mark.

Standalone on purpose, like every server in ``bench/``: its own process with no import from
``service/`` or ``tests/``, so its CPU is never Relay's and it runs unchanged against a
baseline revision (``compare.py --baseline``). The test servers live in ``tests/support/``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal


class CountingUpstream:
    def __init__(self, delay: float, every: float = 0.0) -> None:
        self.delay = delay
        self.every = every
        self.open = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.answered = 0

    def stats(self, reset: bool) -> bytes:
        body = json.dumps(
            {
                "open": self.open - 1,  # not counting the connection asking
                "in_flight": self.in_flight,
                "max_in_flight": self.max_in_flight,
                "answered": self.answered,
            }
        ).encode()
        if reset:
            self.max_in_flight = self.in_flight
        return body

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ", 2)[1]
                if target.startswith(b"/stats"):
                    body = self.stats(reset=b"reset" in target)
                else:
                    self.in_flight += 1
                    self.max_in_flight = max(self.max_in_flight, self.in_flight)
                    try:
                        if target.startswith(b"/slow"):
                            await asyncio.sleep(self.delay)
                        elif self.every:
                            await asyncio.sleep(self.every)
                    finally:
                        self.in_flight -= 1
                    body = b"ok"
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
                self.answered += 1
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            self.open -= 1
            writer.close()


async def serve(port: int, delay: float, every: float = 0.0, host: str = "127.0.0.1") -> None:
    upstream = CountingUpstream(delay, every)
    server = await asyncio.start_server(upstream.handle, host, port, backlog=1024)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--every", type=float, default=0.0)
    parser.add_argument("--host", default="127.0.0.1", help="a loopback address")
    args = parser.parse_args()
    asyncio.run(serve(args.port, args.delay, args.every, args.host))


if __name__ == "__main__":
    main()
