"""A small upstream served next to the proxy by the built-in default config.

It exists so that a bare ``python -m service`` proxies something real: every response
comes over a real socket from this app, through the proxy's pooled client.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

MAX_DEMO_BYTES = 64 * 1024 * 1024
MAX_DEMO_DELAY = 60.0


def create_demo_app() -> FastAPI:
    app = FastAPI(title="relay demo upstream", openapi_url=None, docs_url=None, redoc_url=None)

    @app.get("/")
    async def index(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "message": "hello from the demo upstream, via relay",
                "path": request.url.path,
                "try": ["/headers", "/bytes/1024", "/stream/5", "/delay/1", "/status/418"],
            }
        )

    @app.api_route("/headers", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
    async def headers(request: Request) -> JSONResponse:
        return JSONResponse({"method": request.method, "headers": dict(request.headers)})

    @app.get("/bytes/{size}")
    async def sized(size: int) -> Response:
        size = max(0, min(size, MAX_DEMO_BYTES))
        return Response(b"x" * size, media_type="application/octet-stream")

    @app.get("/stream/{lines}")
    async def stream(lines: int) -> StreamingResponse:
        async def produce() -> AsyncIterator[bytes]:
            for index in range(max(0, min(lines, 1000))):
                yield f"line {index}\n".encode()
                await asyncio.sleep(0.05)

        return StreamingResponse(produce(), media_type="text/plain")

    @app.get("/delay/{seconds}")
    async def delay(seconds: float) -> JSONResponse:
        await asyncio.sleep(max(0.0, min(seconds, MAX_DEMO_DELAY)))
        return JSONResponse({"delayed": seconds})

    @app.get("/status/{code}")
    async def status(code: int) -> Response:
        return Response(status_code=code if 200 <= code <= 599 else 400)

    @app.post("/echo")
    async def echo(request: Request) -> Response:
        body = await request.body()
        return Response(body, media_type=request.headers.get("content-type"))

    return app
