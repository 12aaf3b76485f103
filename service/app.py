"""App factory: the proxy's FastAPI app with its lifespan, and the admin app sharing its state.

The proxy is the FastAPI router's default: it answers every request no route of the app
matched, so FastAPI's lifespan, exception handling and middleware are the real ones, and
routes or middleware added to ``Relay.app`` (see ``server.app_hook``) come first.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
from fastapi import FastAPI

from .config import ConfigError, Settings
from .exchange import ExchangeObserver, Observers
from .proxy import Proxy
from .retries import retry_reasons
from .telemetry.logs import AccessLogObserver
from .telemetry.metrics import Metrics
from .telemetry.pod import WorkerSlot, WorkerState
from .telemetry.tracing import Tracing, TracingObserver, current_exemplar
from .upstreams.endpoints import EndpointCounts
from .upstreams.gated import PoolSnapshot
from .upstreams.pools import UpstreamSet
from .upstreams.tls import TlsSource, check_files, tls_settings

POOL_SAMPLE_SECONDS = 1.0

AppHook = Callable[[FastAPI], None]


def load_app_hook(spec: str | None) -> AppHook | None:
    """The ``server.app_hook`` function (``module:function``), imported."""
    if spec is None:
        return None
    module_name, _, attribute = spec.partition(":")
    try:
        target: object = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except Exception as exc:  # anything the import itself raises is the hook's fault
        raise ConfigError(f"server.app_hook: cannot load {spec!r}: {exc}") from exc
    if not callable(target):
        raise ConfigError(f"server.app_hook: {spec!r} is not callable")
    hook: AppHook = target
    return hook


def check_tls_files(settings: Settings) -> None:
    """Read every upstream's TLS files now: a bad one stops the start (``ConfigError``
    naming the field) rather than failing the first requests. The contexts built are the
    ones the upstreams then share."""
    for name, upstream in settings.upstreams.items():
        check_files(name, upstream)


class Health:
    """Lifecycle flags read by the probes; written by the lifespan and the drain sequence.

    A worker under a supervisor also publishes them to its slot of the pod's table, and
    answers readiness for the pod."""

    def __init__(self, slot: WorkerSlot | None = None) -> None:
        self._slot: WorkerSlot | None = None  # nothing is published while it is built
        self.ready = False
        self.draining = False
        self._slot = slot

    def __setattr__(self, name: str, value: object) -> None:
        super().__setattr__(name, value)
        if name in ("ready", "draining"):
            self._publish()

    def _publish(self) -> None:
        if self._slot is None:
            return
        if self.draining:
            self._slot.publish(WorkerState.DRAINING)
        else:
            self._slot.publish(WorkerState.READY if self.ready else WorkerState.STARTING)

    def readiness(self) -> tuple[bool, str]:
        """(ready, the word the probe answers): the pod's with a supervisor, else this
        process's."""
        if self._slot is not None:
            return self._slot.table.readiness()
        if self.draining:
            return False, "draining"
        if not self.ready:
            return False, "starting"
        return True, "ready"


class Relay:
    """Everything one worker serves: the proxy app, the admin app and their shared state."""

    def __init__(
        self,
        settings: Settings,
        *,
        tracing: Tracing | None = None,
        slot: WorkerSlot | None = None,
    ) -> None:
        """``slot``: this worker's place in its pod (several workers), for readiness and the
        pod's process metrics."""
        self.settings = settings
        self.health = Health(slot)
        self.tracing = tracing
        self._upstreams: UpstreamSet | None = None
        self.metrics = Metrics(
            self._snapshots,
            exemplar=current_exemplar if tracing else None,
            pod=slot.table if slot is not None else None,
            endpoint_counts=self._endpoint_counts,
        )
        self.metrics.endpoints.start_at_zero(settings.upstreams)
        self.metrics.start_at_zero(
            settings.upstreams,
            [(route.upstream, route.label) for route in settings.routes],
            [name for name, config in settings.upstreams.items() if tls_settings(config).files()],
            retry_reasons(settings.routes),
            [(route.upstream, route.label) for route in settings.routes if route.websocket],
        )
        chain: list[ExchangeObserver] = [self.metrics]
        if settings.log.access_log:
            chain.insert(0, AccessLogObserver(settings.log.access_sample))
        if tracing is not None:
            chain.append(TracingObserver())
        self.observers = Observers(chain)
        self.proxy = Proxy(settings, self.upstreams, self.observers, self.metrics.websocket)
        self.app = FastAPI(
            title="relay",
            openapi_url=None,  # no schema, docs or redoc routes: every path is proxied
            redirect_slashes=False,
            lifespan=self._lifespan,
            # Spans come from opentelemetry-instrumentation-fastapi (tracing.Tracing);
            # FastAPI's own telemetry would trace the same requests a second time.
            telemetry={"tracing": False, "metrics": False, "logs": False},
        )
        self.app.router.default = self.proxy
        hook = load_app_hook(settings.server.app_hook)
        if hook is not None:
            hook(self.app)
        if tracing is not None:
            tracing.instrument_app(self.app)

    def _snapshots(self) -> list[PoolSnapshot]:
        return self._upstreams.snapshots() if self._upstreams is not None else []

    def _endpoint_counts(self) -> list[tuple[str, EndpointCounts]]:
        if self._upstreams is None:
            return []
        # Only upstreams of many endpoints: one URL's single endpoint is always healthy,
        # and 4 series for each of thousands of upstreams would say nothing.
        return [
            (u.name, u.balancer.endpoints.counts())
            for u in self._upstreams.values()
            if u.balancer is not None
        ]

    def upstreams_view(self) -> dict[str, Any]:
        """Each upstream's endpoints (the admin ``/upstreams``); empty until the pools open."""
        if self._upstreams is None:
            return {}
        return {u.name: u.endpoints_view() for u in self._upstreams.values()}

    def upstreams(self) -> UpstreamSet:
        if self._upstreams is None:
            raise RuntimeError("upstream pools are not open")
        return self._upstreams

    @asynccontextmanager
    async def _lifespan(self, app: object) -> AsyncIterator[None]:
        wrap = self.tracing.wrap_transport if self.tracing is not None else None
        upstreams = UpstreamSet(
            self.settings.upstreams, self.metrics, wrap, endpoint_observer=self.metrics.endpoints
        )
        await upstreams.open()
        self._upstreams = upstreams
        self.health.ready = True
        try:
            async with anyio.create_task_group() as tg:
                if self.metrics.multiprocess:
                    tg.start_soon(self._sample_pools)
                for source, names in upstreams.tls_sources().items():
                    tg.start_soon(self._watch_tls, source, names)
                yield
                tg.cancel_scope.cancel()
        finally:
            self.health.ready = False
            await upstreams.close()
            self._upstreams = None
            self.metrics.sample_pools()
            if self.tracing is not None:
                # Flushes queued spans; bounded by the exporter's own timeout.
                await anyio.to_thread.run_sync(self.tracing.shutdown)

    async def _watch_tls(self, source: TlsSource, upstreams: list[str]) -> None:
        """Re-read ``source``'s files when they change: a stat of each per interval, off the
        request path; the rebuild (CA bundle parsing) in a thread."""
        while True:
            await anyio.sleep(source.settings.reload_interval_seconds)
            swapped = await anyio.to_thread.run_sync(source.refresh)
            if swapped is not None:
                self.metrics.tls_reload(upstreams, swapped)

    async def _sample_pools(self) -> None:
        while True:
            self.metrics.sample_pools()
            await anyio.sleep(POOL_SAMPLE_SECONDS)
