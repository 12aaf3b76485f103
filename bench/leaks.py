"""Leak safety under cancellation, per transport, in one run (encode/httpcore#1093).

An upstream answers after 200 ms; the pool allows 4 connections; 200 clients give up after
50 ms, most of them while queued for a pool slot. Afterwards a healthy pool has nothing in
use and nobody waiting, and 4 fresh requests all succeed within one upstream delay.

Rows: Relay's gated transports (as configured in production) and, for reference, a bare
``httpx.AsyncClient`` with its default httpcore pool and no gate.

    python bench/leaks.py
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import UpstreamConfig
from service.upstreams import Upstream, _NullObserver

DELAY, LIMIT, CLIENTS, GIVE_UP = 0.2, 4, 200, 0.05


async def slow_upstream() -> tuple[asyncio.Server, str, asyncio.Event]:
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while not stop.is_set():
                head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                halt = asyncio.ensure_future(stop.wait())
                await asyncio.wait([head, halt], return_when=asyncio.FIRST_COMPLETED)
                halt.cancel()
                if not head.done():
                    head.cancel()
                    return
                head.result()
                await asyncio.sleep(DELAY)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/", stop


async def storm(client: httpx.AsyncClient, url: str) -> None:
    async def one() -> None:
        with contextlib.suppress(TimeoutError, httpx.HTTPError):
            await asyncio.wait_for(client.get(url), GIVE_UP)

    await asyncio.gather(*(one() for _ in range(CLIENTS)))
    await asyncio.sleep(DELAY * 3)


async def fresh_ok(client: httpx.AsyncClient, url: str) -> str:
    started = time.monotonic()
    try:
        responses = await asyncio.wait_for(
            asyncio.gather(*(client.get(url) for _ in range(LIMIT))), DELAY * 10
        )
    except (TimeoutError, httpx.HTTPError) as exc:
        return f"FAILED ({type(exc).__name__})"
    ok = sum(r.status_code == 200 for r in responses)
    return f"{ok}/{LIMIT} ok in {time.monotonic() - started:.2f}s"


async def relay_row(url: str, transport: str) -> dict[str, Any]:
    config = UpstreamConfig(
        url=url,
        transport=transport,  # type: ignore[arg-type]
        pool={"max_connections": LIMIT, "max_keepalive_connections": LIMIT},  # type: ignore[arg-type]
        timeouts={"pool": 2.0},  # type: ignore[arg-type]
    )
    upstream = Upstream("bench", config, _NullObserver())
    async with upstream.client as client:
        await storm(client, url)
        snap = upstream.snapshot()
        fresh = await fresh_ok(client, url)
    return {"in_use": snap.in_use, "waiting": snap.waiting, "fresh": fresh}


async def bare_httpx_row(url: str) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=LIMIT, max_keepalive_connections=LIMIT)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(5, pool=2.0)) as client:
        await storm(client, url)
        pool = client._transport._pool  # type: ignore[attr-defined]
        busy = sum(1 for c in pool.connections if not c.is_idle())
        queued = len(pool._requests)
        fresh = await fresh_ok(client, url)
    return {"in_use": busy, "waiting": queued, "fresh": fresh}


async def main() -> None:
    server, url, stop = await slow_upstream()
    rows = [
        ("Relay gate + aiohttp transport", await relay_row(url, "aiohttp")),
        ("Relay gate + httpcore transport", await relay_row(url, "httpcore")),
        ("bare httpx.AsyncClient (httpcore pool, no gate)", await bare_httpx_row(url)),
    ]
    stop.set()
    server.close()
    await server.wait_closed()
    await asyncio.sleep(0.1)
    print(
        f"{CLIENTS} clients giving up after {GIVE_UP * 1000:.0f} ms, pool of {LIMIT}, "
        f"upstream delay {DELAY * 1000:.0f} ms\n"
    )
    print("| client | in use after | waiting after | 4 fresh requests |")
    print("|---|---:|---:|---|")
    for name, row in rows:
        print(f"| {name} | {row['in_use']} | {row['waiting']} | {row['fresh']} |")


if __name__ == "__main__":
    asyncio.run(main())
