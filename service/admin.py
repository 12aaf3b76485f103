"""The admin listener: liveness, readiness and metrics, on a port of its own.

Kept off the proxy port so that upstream paths such as ``/metrics`` or ``/healthz`` still
reach the upstream.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse


@dataclass
class Health:
    """Lifecycle flags read by the probes; written by the lifespan and the drain sequence."""

    ready: bool = False
    draining: bool = False


def create_admin_app(health: Health) -> FastAPI:
    app = FastAPI(title="relay admin", openapi_url=None, docs_url=None, redoc_url=None)

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

    return app
