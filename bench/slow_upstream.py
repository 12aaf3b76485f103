"""A slow upstream for the benchmarks: every GET is answered after a fixed delay (loopback).

    python bench/slow_upstream.py --port PORT [--delay-ms 100] [--size 1024] [--processes 2]

Raw asyncio on uvloop, HTTP/1.1 keep-alive, bodiless requests only: each request's answer
(``--size`` bytes, Content-Length) is written ``--delay-ms`` after its head arrived, so a
client with N connections can get at most N / delay requests per second. nginx has no way
to delay a response, hence this server. ``--processes`` copies share the port through
SO_REUSEPORT so the upstream itself is not what limits a benchmark at 1,000 connections;
they all live in the caller's process group and stop with it (SIGTERM or SIGINT).

Standalone on purpose, like every server in ``bench/``: its own process with no import from
``service/`` or ``tests/``, so its CPU is never Relay's and it runs unchanged against a
baseline revision (``compare.py --baseline``). The test servers live in ``tests/support/``.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal

import uvloop

LOOPBACK = "127.0.0.1"


class SlowServer:
    def __init__(self, delay: float, size: int) -> None:
        self.delay = delay
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n" % size
        self.response = head + b"x" * size

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                await asyncio.sleep(self.delay)
                writer.write(self.response)
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


async def serve(port: int, delay: float, size: int) -> None:
    handler = SlowServer(delay, size)
    server = await asyncio.start_server(
        handler.handle, LOOPBACK, port, backlog=4096, reuse_port=True
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


def run(port: int, delay: float, size: int) -> None:
    uvloop.run(serve(port, delay, size))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=100.0)
    parser.add_argument("--size", type=int, default=1024, help="response body bytes")
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()
    delay = args.delay_ms / 1000
    # Forked before any event loop exists; the copies stay in this process group.
    context = multiprocessing.get_context("fork")
    copies = [
        context.Process(target=run, args=(args.port, delay, args.size), daemon=True)
        for _ in range(args.processes - 1)
    ]
    for copy in copies:
        copy.start()
    try:
        run(args.port, delay, args.size)
    finally:
        for copy in copies:
            copy.terminate()
            copy.join(5)


if __name__ == "__main__":
    main()
