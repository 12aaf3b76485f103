"""The naive FastAPI reverse proxy, for comparison (bench only, loopback).

    python bench/naive.py --port PORT --upstream URL [--transport httpx|aiohttp]
                          [--max-connections 100]

The pattern FastAPI users are pointed to for proxying: one ``httpx.AsyncClient`` opened in
the lifespan, a catch-all route that builds the upstream request with the incoming body as
``request.stream()``, ``client.send(..., stream=True)``, and a ``StreamingResponse`` over
``aiter_raw()`` with ``aclose`` as a background task. Served by uvicorn, 1 worker, uvloop
and httptools, access log off.

Only what a working proxy cannot do without is added: hop-by-hop headers are dropped both
ways, Host is the upstream's, and a request without a body is sent without one (otherwise
httpx sends every GET chunked). No metrics, no tracing, no logs, no error mapping, no
disconnect handling. The pool gets the same size as Relay's in the same load (``--max-
connections``, all kept alive) and Relay's default timeouts (connect 5 s, read/write 30 s,
pool 5 s), so limits are not what differs.

``--transport aiohttp`` swaps in the ``httpx-aiohttp`` package's ``AiohttpTransport`` (same
limits); everything else is the same.

Standalone on purpose: a reference, not Relay code. It imports nothing from ``service/`` or
``tests/`` so that it stays the pattern as documented, whatever Relay becomes.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

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
    }
)
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def make_client(upstream: str, transport: str, max_connections: int) -> httpx.AsyncClient:
    if transport == "defaults":
        # Exactly as the FastAPI/httpx documentation shows it: every limit and timeout at
        # httpx's defaults (100 connections, 20 kept alive, 5 s timeouts).
        return httpx.AsyncClient(base_url=upstream)
    limits = httpx.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections
    )
    timeout = httpx.Timeout(30.0, connect=5.0, pool=5.0)
    if transport == "aiohttp":
        from httpx_aiohttp import AiohttpTransport

        return httpx.AsyncClient(
            base_url=upstream,
            transport=AiohttpTransport(limits=limits, trust_env=False),
            timeout=timeout,
            trust_env=False,
        )
    return httpx.AsyncClient(base_url=upstream, limits=limits, timeout=timeout, trust_env=False)


def create_app(upstream: str, transport: str, max_connections: int) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with make_client(upstream, transport, max_connections) as client:
            app.state.client = client
            yield

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.api_route("/{path:path}", methods=METHODS)
    async def proxy(request: Request, path: str) -> StreamingResponse:
        client: httpx.AsyncClient = request.app.state.client
        url = httpx.URL(path=request.url.path, query=request.url.query.encode())
        headers = [
            (name, value)
            for name, value in request.headers.raw
            if name.lower().decode() not in HOP_BY_HOP and name.lower() != b"host"
        ]
        has_body = "content-length" in request.headers or "transfer-encoding" in request.headers
        upstream_request = client.build_request(
            request.method,
            url,
            headers=headers,
            content=request.stream() if has_body else None,
        )
        response = await client.send(upstream_request, stream=True)
        return StreamingResponse(
            response.aiter_raw(),
            status_code=response.status_code,
            headers={k: v for k, v in response.headers.items() if k.lower() not in HOP_BY_HOP},
            background=BackgroundTask(response.aclose),
        )

    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:8081")
    parser.add_argument("--transport", choices=("httpx", "aiohttp", "defaults"), default="httpx")
    parser.add_argument("--max-connections", type=int, default=100)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.upstream, args.transport, args.max_connections),
        host=LOOPBACK,
        port=args.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level="warning",
        backlog=2048,
    )


if __name__ == "__main__":
    main()
