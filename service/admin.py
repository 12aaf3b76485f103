"""The admin listener: liveness, readiness and metrics, on a port of its own.

Kept off the proxy port so that upstream paths such as ``/metrics`` or ``/healthz`` still
reach the upstream.

``/healthz`` is this process's liveness. ``/readyz`` is the pod's readiness: with several
workers any of them may take the probe, so each answers for the pod (pod.py).
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response

from .pod import WorkerSlot, WorkerState

RenderMetrics = Callable[[str | None], tuple[bytes, str]]


class Health:
    """Lifecycle flags read by the probes; written by the lifespan and the drain sequence.

    A worker under a supervisor also publishes them to its slot of the pod's table, and
    answers readiness for the pod."""

    def __init__(self, slot: WorkerSlot | None = None) -> None:
        self._slot = slot
        self._ready = False
        self._draining = False

    @property
    def ready(self) -> bool:
        return self._ready

    @ready.setter
    def ready(self, value: bool) -> None:
        self._ready = value
        self._publish()

    @property
    def draining(self) -> bool:
        return self._draining

    @draining.setter
    def draining(self, value: bool) -> None:
        self._draining = value
        self._publish()

    def _publish(self) -> None:
        if self._slot is None:
            return
        if self._draining:
            self._slot.publish(WorkerState.DRAINING)
        else:
            self._slot.publish(WorkerState.READY if self._ready else WorkerState.STARTING)

    def readiness(self) -> tuple[bool, str]:
        """(ready, the word the probe answers): the pod's with a supervisor, else this
        process's."""
        if self._slot is not None:
            return self._slot.table.readiness()
        if self._draining:
            return False, "draining"
        if not self._ready:
            return False, "starting"
        return True, "ready"


def create_admin_app(health: Health, render_metrics: RenderMetrics) -> FastAPI:
    app = FastAPI(title="relay admin", openapi_url=None, docs_url=None, redoc_url=None)
    # An exact route: Prometheus does not follow a /metrics -> /metrics/ redirect.
    app.router.redirect_slashes = False

    @app.get("/healthz", response_class=PlainTextResponse)
    async def healthz() -> str:
        return "ok\n"

    @app.get("/readyz", response_class=PlainTextResponse)
    async def readyz() -> PlainTextResponse:
        ready, word = health.readiness()
        return PlainTextResponse(f"{word}\n", status_code=200 if ready else 503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = render_metrics(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
