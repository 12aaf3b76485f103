"""The admin listener: liveness, readiness, metrics and the upstreams' endpoints, on a port
of its own.

Kept off the proxy port so that upstream paths such as ``/metrics`` or ``/healthz`` still
reach the upstream.

``/upstreams`` is this worker's view of each upstream's endpoints (JSON: address, state,
in flight, pool, failures, ejection). ``/healthz`` is this process's liveness. ``/readyz``
is the pod's readiness: with several workers any of them may take the probe, so each
answers for the pod (telemetry/pod.py). ``/metrics`` with several workers merges every
worker's files: that runs in a thread, never on the loop that serves proxy traffic, with at
most ``MAX_SCRAPES`` at once and ``MAX_WAITING_SCRAPES`` queued behind them (more are
answered 503 at once rather than piling up threads' work).
"""

from __future__ import annotations

from collections.abc import Callable

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ..app import Relay

RenderMetrics = Callable[[str | None], tuple[bytes, str]]

MAX_SCRAPES = 2
MAX_WAITING_SCRAPES = 8


class _Scrapes:
    """Metrics rendered in a thread, a bounded number at once and a bounded number queued."""

    def __init__(self, render: RenderMetrics) -> None:
        self._render = render
        self._limiter: anyio.CapacityLimiter | None = None
        self._admitted = 0  # running or queued; counted here, where no await comes between

    async def __call__(self, accept: str | None) -> Response:
        if self._limiter is None:  # made on the loop that uses it
            self._limiter = anyio.CapacityLimiter(MAX_SCRAPES)
        if self._admitted >= MAX_SCRAPES + MAX_WAITING_SCRAPES:
            return PlainTextResponse(
                "busy: too many scrapes at once\n", status_code=503, headers={"Retry-After": "1"}
            )
        self._admitted += 1
        try:
            body, content_type = await anyio.to_thread.run_sync(
                self._render, accept, limiter=self._limiter
            )
        finally:
            self._admitted -= 1
        return Response(body, media_type=content_type)


def create_admin_app(relay: Relay) -> FastAPI:
    """The admin app of ``relay``: its health flags and its metrics."""
    health, render_metrics = relay.health, relay.metrics.render
    app = FastAPI(title="relay admin", openapi_url=None, docs_url=None, redoc_url=None)
    # An exact route: Prometheus does not follow a /metrics -> /metrics/ redirect.
    app.router.redirect_slashes = False
    scrapes = _Scrapes(render_metrics) if relay.metrics.multiprocess else None

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok\n"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> PlainTextResponse:
        ready, word = health.readiness()
        return PlainTextResponse(f"{word}\n", status_code=200 if ready else 503)

    @app.get("/upstreams")
    async def upstreams() -> JSONResponse:
        # This worker's view: with several workers, each has its own endpoint states.
        return JSONResponse(relay.upstreams_view())

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        accept = request.headers.get("accept")
        if scrapes is not None:
            return await scrapes(accept)
        # One process: the registry is in memory and quick to encode.
        body, content_type = render_metrics(accept)
        return Response(body, media_type=content_type)

    return app
