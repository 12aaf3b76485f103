"""The admin listener: liveness, readiness and metrics, on a port of its own.

Kept off the proxy port so that upstream paths such as ``/metrics`` or ``/healthz`` still
reach the upstream.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

RenderMetrics = Callable[[str | None], tuple[bytes, str]]


@dataclass
class Health:
    """Lifecycle flags read by the probes; written by the lifespan and the drain sequence."""

    ready: bool = False
    draining: bool = False


def create_admin_app(health: Health, render_metrics: RenderMetrics) -> FastAPI:
    app = FastAPI(title="relay admin", openapi_url=None, docs_url=None, redoc_url=None)
    # An exact route: Prometheus does not follow a /metrics -> /metrics/ redirect.
    app.router.redirect_slashes = False

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok\n"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> PlainTextResponse:
        if health.draining:
            return PlainTextResponse("draining\n", status_code=503)
        if not health.ready:
            return PlainTextResponse("starting\n", status_code=503)
        return PlainTextResponse("ready\n")

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render_metrics(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
