"""Serving: the proxy, admin and (optional) demo listeners in one event loop, and the drain.

On SIGTERM (or SIGINT): readiness flips to not-ready at once; the proxy keeps accepting for
``drain_delay_seconds`` so load balancers notice; then it stops accepting, lets in-flight
exchanges (long streams included) finish for up to ``grace_period_seconds``, cancels what is
left, and closes the upstream pools. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .app import Relay
from .coalesce import CoalescedWrites
from .config import Settings
from .demo import create_demo_app
from .exchange import ExchangeObserver
from .limits import guarded_protocol
from .logs import install_abort_filter
from .tracing import Tracing

log = logging.getLogger("relay.server")

# How long a connection accepted just before the listener closed may take to send its
# request head once the drain has begun.
FRESH_CONNECTION_GRACE_SECONDS = 1.0


class _Server(uvicorn.Server):
    """uvicorn's server without its own signal handling: the drain sequence owns signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class _DrainSafe(HttpToolsProtocol):
    """When the listener closes, uvicorn closes every connection with no request under way.

    A connection accepted just before has its request on the way, or already in the socket
    unread: closing it would reset a request the client sent to an open listener. So such a
    connection gets ``FRESH_CONNECTION_GRACE_SECONDS`` for its request head, and that one
    request is served, with ``Connection: close``.
    """

    _draining = False

    def shutdown(self) -> None:
        if self.cycle is None and not self.transport.is_closing():
            self._draining = True
            self.loop.call_later(FRESH_CONNECTION_GRACE_SECONDS, self._close_if_no_request)
            return
        super().shutdown()

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False

    def _close_if_no_request(self) -> None:
        if self.cycle is None:
            self.transport.close()


def _proxy_protocol(settings: Settings, observer: ExchangeObserver) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol for the proxy listener, in one place: the drain above,
    coalesced response writes, and the request limits and hostile-input checks."""
    limited = guarded_protocol(settings.limits, server_name=settings.server.name, observer=observer)
    return type("RelayHttpToolsProtocol", (_DrainSafe, CoalescedWrites, limited), {})


def _uvicorn_config(app: Any, host: str, port: int, **extra: Any) -> uvicorn.Config:
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        server_header=False,
        # The proxy builds X-Forwarded-* itself from the real peer and its trusted list.
        proxy_headers=False,
        # Responses carry the upstream's own Date; proxy errors add theirs.
        date_header=False,
        loop="none",
        **extra,
    )


@dataclass(frozen=True)
class Listeners:
    """Sockets bound once by a supervisor and shared by its workers (None: bind here)."""

    proxy: socket.socket | None
    admin: socket.socket | None
    demo: socket.socket | None


def _one(sock: socket.socket | None) -> list[socket.socket] | None:
    return [sock] if sock is not None else None


class Service:
    def __init__(self, settings: Settings, relay: Relay | None = None) -> None:
        install_abort_filter()
        self.settings = settings
        self.relay = relay or Relay(settings, tracing=Tracing.from_env(settings.tracing))
        server = settings.server
        self.proxy_server = _Server(
            _uvicorn_config(
                self.relay.app,
                server.host,
                server.port,
                lifespan="on",
                backlog=server.backlog,
                timeout_graceful_shutdown=server.grace_period_seconds,
                http=_proxy_protocol(settings, self.relay.observers),
                limit_concurrency=server.limit_concurrency or None,
            )
        )
        self.admin_server = _Server(
            _uvicorn_config(
                self.relay.admin_app, server.admin_host, server.admin_port, lifespan="off"
            )
        )
        self.demo_server: _Server | None = None
        if settings.demo.enabled:
            self.demo_server = _Server(
                _uvicorn_config(
                    create_demo_app(), settings.demo.host, settings.demo.port, lifespan="off"
                )
            )
        self._draining: asyncio.Task[None] | None = None

    def request_shutdown(self) -> None:
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain())
        else:
            log.warning("second shutdown signal: skipping the remaining grace period")
            self.proxy_server.force_exit = True
            self.proxy_server.should_exit = True

    async def _drain(self) -> None:
        delay = self.settings.server.drain_delay_seconds
        self.relay.health.draining = True
        log.info("draining: not ready; closing the proxy listener in %.1fs", delay)
        await asyncio.sleep(delay)
        self.proxy_server.should_exit = True

    async def serve(self, sockets: Listeners | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_shutdown)
        bound = sockets or Listeners(None, None, None)
        background = [asyncio.create_task(self.admin_server.serve(_one(bound.admin)))]
        if self.demo_server is not None:
            background.append(asyncio.create_task(self.demo_server.serve(_one(bound.demo))))
        try:
            await self.proxy_server.serve(_one(bound.proxy))
        finally:
            self.relay.health.ready = False
            for server in (self.admin_server, self.demo_server):
                if server is not None:
                    server.should_exit = True
            await asyncio.gather(*background, return_exceptions=True)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        if not self.proxy_server.started:
            raise SystemExit(3)


def serve_forever(settings: Settings, sockets: Listeners | None = None) -> None:
    """Run one worker's event loop until it has drained."""
    import uvloop

    try:
        uvloop.run(Service(settings).serve(sockets))
    finally:
        # Worker processes end without interpreter shutdown hooks: write buffered lines.
        for handler in logging.getLogger().handlers:
            handler.flush()
