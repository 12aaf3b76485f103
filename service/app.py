"""App factory: the proxy app with its lifespan, and the admin app sharing its state."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from starlette.routing import Mount

from .admin import Health, create_admin_app
from .config import Settings
from .exchange import Exchange, ExchangeObserver
from .logs import AccessLogObserver
from .metrics import ExemplarSource, Metrics
from .proxy import Proxy
from .upstreams import PoolSnapshot, UpstreamSet

POOL_SAMPLE_SECONDS = 1.0


class Observers:
    """Fans exchange events out to every observer (access log, metrics, ...)."""

    def __init__(self, observers: Sequence[ExchangeObserver]) -> None:
        self._observers = tuple(observers)

    def started(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer.started(exchange)

    def headers(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer.headers(exchange)

    def finished(self, exchange: Exchange) -> None:
        for observer in self._observers:
            observer.finished(exchange)


class Relay:
    """Everything one worker serves: the proxy app, the admin app and their shared state."""

    def __init__(
        self,
        settings: Settings,
        *,
        observers: Sequence[ExchangeObserver] = (),
        exemplar: ExemplarSource | None = None,
    ) -> None:
        self.settings = settings
        self.health = Health()
        self._upstreams: UpstreamSet | None = None
        self.metrics = Metrics(self._snapshots, exemplar=exemplar)
        observer = Observers([AccessLogObserver(), self.metrics, *observers])
        self.proxy = Proxy(settings, self.upstreams, observer)
        self.proxy_app = FastAPI(
            lifespan=self._lifespan, openapi_url=None, docs_url=None, redoc_url=None
        )
        self.proxy_app.router.routes.append(Mount("/", app=self.proxy))
        self.admin_app = create_admin_app(self.health, self.metrics.render)

    def _snapshots(self) -> list[PoolSnapshot]:
        return self._upstreams.snapshots() if self._upstreams is not None else []

    def upstreams(self) -> UpstreamSet:
        if self._upstreams is None:
            raise RuntimeError("upstream pools are not open")
        return self._upstreams

    @asynccontextmanager
    async def _lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        upstreams = UpstreamSet(self.settings.upstreams, self.metrics)
        await upstreams.open()
        self._upstreams = upstreams
        self.health.ready = True
        try:
            async with anyio.create_task_group() as tg:
                if self.metrics.multiprocess:
                    tg.start_soon(self._sample_pools)
                yield
                tg.cancel_scope.cancel()
        finally:
            self.health.ready = False
            await upstreams.close()
            self._upstreams = None
            self.metrics.sample_pools()

    async def _sample_pools(self) -> None:
        while True:
            self.metrics.sample_pools()
            await anyio.sleep(POOL_SAMPLE_SECONDS)
