"""Serving: the proxy, admin and (optional) demo listeners in one event loop, and the drain.

On SIGTERM (or SIGINT): readiness flips to not-ready at once; the proxy keeps accepting for
``drain_delay_seconds`` so load balancers notice; then it stops accepting, lets in-flight
exchanges (long streams included) finish for up to ``grace_period_seconds``, cuts what is
left (each cut exchange answers and logs as such), and closes the upstream pools. A second
signal cuts the drain short. A worker process under a supervisor takes any repeat of SIGTERM
or SIGINT as the same request (a Ctrl-C reaches it from the terminal and again through the
supervisor); there the supervisor's ``CUT_SIGNAL`` cuts the drain short.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Callable
from typing import Any

import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..app import Relay
from ..config import Settings
from ..telemetry.logs import install_uvicorn_filters
from ..telemetry.pod import WorkerSlot
from ..telemetry.tracing import Tracing
from .admin import create_admin_app
from .demo import create_demo_app
from .listeners import EXIT_CANNOT_START, Listeners, bind_listeners
from .protocol import RelayProtocol
from .uvicorn_compat import DrainSafeWebSocket, UvicornServer

log = logging.getLogger("relay.server")

# Once requests are cut, how long they get to send their answer and write their access line.
CUT_SECONDS = 5.0
POLL_SECONDS = 0.1
# From a supervisor to its workers: a second stop signal arrived, cut the drain short.
CUT_SIGNAL = signal.SIGUSR1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The admin and demo listeners close once the proxy has drained: by then nothing the proxy
# serves depends on them, so what is left there gets this long.
SIDE_LISTENER_GRACE_SECONDS = 1.0
# The cyclic collector's thresholds in a serving process (see tune_gc).
GC_THRESHOLDS = (20_000, 20, 20)
CUT_HEADERS = [
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"14"),
    (b"connection", b"close"),
]


class _Server(UvicornServer):
    """uvicorn's server with the service in charge of signals and of the shutdown's steps.

    uvicorn's own shutdown could only be cut short by skipping the application's lifespan
    shutdown (pools left open, an error traceback from the lifespan) and let cut requests
    end in uvicorn's error handler (a 500 and an ERROR line each). Here a cut, whether the
    grace period ran out or a second signal came, cancels the requests still running, gives
    them ``CUT_SECONDS`` to answer, then runs the lifespan shutdown as usual.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.cut = asyncio.Event()
        self.on_started: Callable[[], None] | None = None
        self.on_closed: Callable[[int], None] | None = None
        self.on_grace_over: Callable[[int], None] | None = None

    @property
    def in_flight(self) -> int:
        return sum(1 for task in self.server_state.tasks if not task.done())

    async def startup(self, sockets: Any = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None:
            self.on_started()

    async def shutdown(self, sockets: Any = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        if self.on_closed is not None:
            self.on_closed(self.in_flight)
        if not await self._settled(self.config.timeout_graceful_shutdown):
            tasks = [task for task in self.server_state.tasks if not task.done()]
            if not self.cut.is_set() and self.on_grace_over is not None:
                self.on_grace_over(len(tasks))
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=CUT_SECONDS)
        await self.lifespan.shutdown()

    async def _settled(self, grace: float | None) -> bool:
        """True once no connection or request is left; False when cut or out of time."""
        loop = asyncio.get_running_loop()
        deadline = None if grace is None else loop.time() + grace
        while self.server_state.connections or self.server_state.tasks:
            if self.cut.is_set() or (deadline is not None and loop.time() >= deadline):
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.cut.wait(), POLL_SECONDS)
        return True


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


def _answer_when_cut(app: ASGIApp) -> ASGIApp:
    """For the admin and demo apps: a request cut at shutdown is answered 503, not left to
    uvicorn's error handler (a 500 and an ERROR line with a CancelledError traceback)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracking(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, receive, tracking)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            if scope["type"] == "http" and not started:
                await send({"type": "http.response.start", "status": 503, "headers": CUT_HEADERS})
                await send({"type": "http.response.body", "body": b"shutting down\n"})

    return wrapped


def tune_gc() -> None:
    """Process-wide, so run once by the process that serves (``serve_forever``), never by
    one that only embeds a ``Service``.

    Everything alive once the proxy serves lives as long as the process. The collector is
    off while it is built (``serve_forever``): collections then only walk the same objects
    again and again, which took 2 of the 4.5 s a start with 10,000 upstreams needed.
    Keeping it all out of the collector's generations makes full collections (latency
    spikes under load) cost what a request allocates, not what the whole program holds.
    The default thresholds (700, 10, 10) collect the youngest generation every few
    requests, each time walking and promoting the objects of every request in flight; with
    1,000 requests in flight these thresholds gave 25-40% more requests per second
    (bench/compare.py, slow-upstream load) for a few MiB of young objects.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    gc.enable()
    log.debug("gc: %d objects frozen, thresholds %s", gc.get_freeze_count(), GC_THRESHOLDS)


def _one(sock: Any) -> list[Any] | None:
    return [sock] if sock is not None else None


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


class Service:
    """One process's listeners and drain. ``worker``: run under a supervisor (see above);
    ``on_ready``: called once the proxy listener serves."""

    def __init__(
        self,
        settings: Settings,
        relay: Relay | None = None,
        *,
        worker: bool = False,
        slot: WorkerSlot | None = None,
        on_ready: Callable[[], None] | None = None,
    ):
        install_uvicorn_filters()
        self.settings = settings
        self.relay = relay or Relay(settings, tracing=Tracing.from_env(settings.tracing), slot=slot)
        self.worker = worker
        self._on_ready = on_ready
        server = settings.server
        self.proxy_server = _Server(
            _uvicorn_config(
                self.relay.app,
                server.host,
                server.port,
                lifespan="on",
                backlog=server.backlog,
                timeout_graceful_shutdown=server.grace_period_seconds,
                http=RelayProtocol.configured(settings, self.relay),
                limit_concurrency=server.limit_concurrency or None,
                timeout_keep_alive=server.keepalive_timeout_seconds,
                ws=DrainSafeWebSocket,
                ws_max_size=settings.websocket.max_message_bytes,
                # Each hop negotiates its own extensions (a message relay, see websocket.py):
                # no compression on either, whose CPU cost a proxy pays twice.
                ws_per_message_deflate=False,
            )
        )
        self.proxy_server.on_started = self._ready
        self.proxy_server.on_closed = self._listener_closed
        self.proxy_server.on_grace_over = self._grace_over
        self.admin_server = _Server(
            _uvicorn_config(
                _answer_when_cut(create_admin_app(self.relay)),
                server.admin_host,
                server.admin_port,
                lifespan="off",
                timeout_graceful_shutdown=SIDE_LISTENER_GRACE_SECONDS,
            )
        )
        self.demo_server: _Server | None = None
        if settings.demo.enabled:
            self.demo_server = _Server(
                _uvicorn_config(
                    _answer_when_cut(create_demo_app()),
                    settings.demo.host,
                    settings.demo.port,
                    lifespan="off",
                    timeout_graceful_shutdown=SIDE_LISTENER_GRACE_SECONDS,
                )
            )
        self._draining: asyncio.Task[None] | None = None
        self._cut = False

    @property
    def _servers(self) -> list[_Server]:
        servers = [self.proxy_server, self.admin_server]
        return servers if self.demo_server is None else [*servers, self.demo_server]

    def request_shutdown(self, cause: str = "shutdown requested") -> None:
        """A stop signal: the first starts the drain; in a process of its own a second one
        cuts it short, while a worker takes repeats as the same request."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(self._drain(cause))
        elif self.worker:
            log.debug("%s: already draining", cause)
        else:
            self.cut_short(f"second signal ({cause})")

    def cut_short(self, cause: str, *, quiet: bool = False) -> None:
        """Skip the rest of the drain: requests still in flight are cut now."""
        if self._cut:
            return
        self._cut = True
        level = logging.DEBUG if quiet else logging.WARNING
        in_flight = self.proxy_server.in_flight
        log.log(level, "%s: cutting the drain short; %s cut", cause, _plural(in_flight, "request"))
        self.relay.health.draining = True
        for server in self._servers:
            server.cut.set()
        self.proxy_server.should_exit = True

    def _cut_by_supervisor(self) -> None:
        # The supervisor logs the second signal once, for all its workers.
        self.cut_short("cut by the supervisor", quiet=True)

    async def _drain(self, cause: str) -> None:
        server = self.settings.server
        self.relay.health.draining = True
        log.info(
            "%s: draining: /readyz answers 503; the proxy listener closes in %gs, then requests "
            "in flight get up to %gs",
            cause,
            server.drain_delay_seconds,
            server.grace_period_seconds,
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proxy_server.cut.wait(), server.drain_delay_seconds)
        self.proxy_server.should_exit = True

    def _ready(self) -> None:
        log.info("ready: relay %s (pid %d)", __version__, os.getpid())
        if self._on_ready is not None:
            self._on_ready()

    def _listener_closed(self, in_flight: int) -> None:
        if self._cut:
            return
        if in_flight:
            log.info(
                "proxy listener closed; waiting up to %gs for %s in flight",
                self.settings.server.grace_period_seconds,
                _plural(in_flight, "request"),
            )
        else:
            log.info("proxy listener closed; no requests in flight")

    def _grace_over(self, in_flight: int) -> None:
        # WebSocket sessions outlive any grace period as a matter of course: closing them
        # with 1001 is the drain working, not requests lost.
        sessions = min(self.relay.proxy.open_sessions, in_flight)
        grace = self.settings.server.grace_period_seconds
        if sessions:
            log.info(
                "grace period (%gs) over: %s closed with 1001 (going away)",
                grace,
                _plural(sessions, "WebSocket session"),
            )
        if in_flight > sessions:
            log.warning(
                "grace period (%gs) over: %s still in flight cut",
                grace,
                _plural(in_flight - sessions, "request"),
            )

    async def serve(self, sockets: Listeners | None = None) -> None:
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_shutdown, sig.name)
        if self.worker:
            loop.add_signal_handler(CUT_SIGNAL, self._cut_by_supervisor)
            # The supervisor starts workers with these blocked, so that a signal arriving
            # while one is still starting waits for the handlers above (see workers.py).
            signal.pthread_sigmask(signal.SIG_UNBLOCK, (*STOP_SIGNALS, CUT_SIGNAL))
        bound = sockets if sockets is not None else bind_listeners(self.settings)
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
            for sig in (*STOP_SIGNALS, CUT_SIGNAL):
                loop.remove_signal_handler(sig)
                if self.worker:
                    # Drained: a stop or cut the supervisor sends from now on (a second
                    # signal racing this exit) has nothing left to do, and must not turn a
                    # clean exit into death by signal.
                    signal.signal(sig, signal.SIG_IGN)
        if not self.proxy_server.started:
            raise SystemExit(EXIT_CANNOT_START)
        log.info("stopped (pid %d)", os.getpid())


def serve_forever(
    settings: Settings, sockets: Listeners, *, slot: WorkerSlot | None = None
) -> None:
    """Run one process's event loop until it has drained; ``slot``: as a worker of a pod."""
    import uvloop

    gc.disable()  # until the proxy is ready: see tune_gc
    try:
        service = Service(settings, worker=slot is not None, slot=slot, on_ready=tune_gc)
        uvloop.run(service.serve(sockets))
    finally:
        gc.enable()
        # Worker processes end without interpreter shutdown hooks: write buffered lines.
        for handler in logging.getLogger().handlers:
            handler.flush()
