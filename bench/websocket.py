"""WebSocket echo through each system, on loopback, bounded in time.

    python bench/websocket.py [--sessions 64] [--size 1024] [--duration 10] [--warmup 2]
                              [--clients 2] [--only direct,nginx,relay]

Systems (rows), all in front of the same upstream (a ``websockets`` echo server, its own
process):
  direct  straight to the upstream: the ceiling;
  nginx   nginx 1 worker, ``proxy_http_version 1.1`` with the Upgrade and Connection headers
          passed on (a byte tunnel after the upstream's 101);
  relay   Relay, 1 worker, access log off (a message relay: see README, *WebSocket*).
Load: ``--sessions`` sessions spread over ``--clients`` client processes, each session
sending one ``--size`` message and waiting for its echo before the next. Reported: messages
(round trips) per second, p50 and p99 round trip, and sessions that failed. The clients, the
systems and the upstream share the machine: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from common import (
    LOOPBACK,
    NGINX_HTTP,
    environment,
    free_port,
    markdown_table,
    nginx,
    process,
    relay,
    wait_ready,
)

ECHO = """
import asyncio, sys
from websockets.asyncio.server import serve
async def echo(connection):
    async for message in connection:
        await connection.send(message)
async def main():
    async with serve(echo, "127.0.0.1", int(sys.argv[1]), compression=None, max_size=None):
        await asyncio.Future()
asyncio.run(main())
"""

NGINX_WEBSOCKET = (
    NGINX_HTTP
    + """  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection "upgrade";
      proxy_read_timeout 1h;
    }}
  }}
}}
"""
)


@contextmanager
def echo_upstream() -> Iterator[int]:
    port = free_port()
    with process([sys.executable, "-c", ECHO, str(port)]) as proc:
        wait_ready(f"http://{LOOPBACK}:{port}/", proc)  # a plain GET gets 426: it is up
        yield port


async def _session(url: str, payload: bytes, until: float, warm: float, rtts: list[float]) -> bool:
    from websockets.asyncio.client import connect

    try:
        async with connect(url, compression=None, max_size=None, open_timeout=10) as ws:
            while (now := time.perf_counter()) < until:
                await ws.send(payload)
                await ws.recv()
                if now >= warm:
                    rtts.append(time.perf_counter() - now)
        return True
    except Exception:
        return False


def _client(
    url: str, sessions: int, size: int, warmup: float, duration: float, out: object
) -> None:
    import uvloop

    async def run() -> tuple[list[float], int]:
        start = time.perf_counter()
        warm, until = start + warmup, start + warmup + duration
        rtts: list[float] = []
        ok = await asyncio.gather(
            *(_session(url, b"x" * size, until, warm, rtts) for _ in range(sessions))
        )
        return rtts, sum(1 for o in ok if not o)

    rtts, failed = uvloop.run(run())
    out.send((rtts, failed))  # type: ignore[attr-defined]


def measure(url: str, args: argparse.Namespace) -> list[object]:
    per_client = max(1, args.sessions // args.clients)
    pipes, procs = [], []
    for _ in range(args.clients):
        receiver, sender = multiprocessing.Pipe(duplex=False)
        proc = multiprocessing.Process(
            target=_client, args=(url, per_client, args.size, args.warmup, args.duration, sender)
        )
        proc.start()
        pipes.append(receiver)
        procs.append(proc)
    rtts: list[float] = []
    failed = 0
    for receiver, proc in zip(pipes, procs, strict=True):
        got, bad = receiver.recv()
        rtts.extend(got)
        failed += bad
        proc.join()
    rtts.sort()

    def pct(q: float) -> str:
        return f"{rtts[min(len(rtts) - 1, int(q * len(rtts)))] * 1000:.2f}" if rtts else "-"

    return [f"{len(rtts) / args.duration:,.0f}", pct(0.5), pct(0.99), failed]


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=64)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--only", default="direct,nginx,relay")
    args = parser.parse_args()
    only = set(args.only.split(","))
    rows = []
    with echo_upstream() as upstream:
        if "direct" in only:
            rows.append(["direct", *measure(f"ws://{LOOPBACK}:{upstream}/", args)])
        if "nginx" in only:
            with nginx(NGINX_WEBSOCKET, upstream=upstream) as served:
                rows.append(["nginx", *measure(f"ws://{LOOPBACK}:{served.port}/", args)])
        if "relay" in only:
            with relay(f"http://{LOOPBACK}:{upstream}", "aiohttp") as served:
                rows.append(["relay", *measure(f"ws://{LOOPBACK}:{served.port}/", args)])
    print(
        f"{args.size} B echo, {args.sessions} sessions, {args.duration:g} s "
        f"(+{args.warmup:g} s warm-up), {args.clients} client processes"
    )
    header = ["system", "messages/s", "p50 ms", "p99 ms", "failed sessions"]
    print(markdown_table(header, rows))
    print(environment())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
