"""A minimal raw aiohttp reverse proxy, for comparison (bench only, loopback).

    python bench/raw_aiohttp.py --port PORT --upstream URL [--max-connections 100]

``aiohttp.web`` on uvloop with one ``ClientSession`` (a pool of ``--max-connections``, all
kept alive, Relay's default timeouts): each request is sent upstream with its body streamed
from the incoming ``StreamReader`` (only when it has one), and the response is streamed back
chunk by chunk as it arrives. Hop-by-hop headers are dropped both ways and Host is the
upstream's; nothing else: no metrics, tracing, logs or error mapping. This is roughly the
least a Python proxy on the same event loop and HTTP stack has to do.

Standalone on purpose: a reference, not Relay code. It imports nothing from ``service/`` or
``tests/``, so it measures aiohttp alone, whatever Relay becomes.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from collections.abc import Mapping

import aiohttp
import uvloop
from aiohttp import web

LOOPBACK = "127.0.0.1"
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


def forwardable(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    # A multidict's items() yields repeated headers once each, so none is lost.
    return [(k, v) for k, v in headers.items() if k.lower() not in HOP_BY_HOP]


async def proxy(request: web.Request) -> web.StreamResponse:
    session = request.app[SESSION]
    body = request.content if request.body_exists else None
    async with session.request(
        request.method,
        request.app[UPSTREAM] + request.raw_path,
        headers=forwardable(request.headers),
        data=body,
        allow_redirects=False,
        auto_decompress=False,
    ) as upstream:
        response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
        for name, value in forwardable(upstream.headers):
            response.headers.add(name, value)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def serve(port: int, upstream: str, max_connections: int) -> None:
    app = web.Application()
    connector = aiohttp.TCPConnector(limit=max_connections, limit_per_host=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30)
    async with aiohttp.ClientSession(
        connector=connector,
        timeout=timeout,
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
    ) as session:
        app[SESSION] = session
        app[UPSTREAM] = upstream.rstrip("/")
        app.router.add_route("*", "/{tail:.*}", proxy)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, LOOPBACK, port, backlog=2048)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--max-connections", type=int, default=100)
    args = parser.parse_args()
    uvloop.run(serve(args.port, args.upstream, args.max_connections))


if __name__ == "__main__":
    main()
