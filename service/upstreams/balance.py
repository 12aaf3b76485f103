"""The balancing transport: below the upstream's gate, each request (each attempt) goes to
one endpoint of the upstream, on that endpoint's own pool.

The request keeps url's Host header and TLS server name; only the address it is sent to
changes (its URL's origin). ``least_request`` draws two eligible endpoints at random and
takes the one with fewer requests in flight (Envoy's and Finagle's "power of two
choices"); ``round_robin`` takes them in turn. A connect failure (nothing was sent) is
tried once more on another endpoint, whatever the method. With no eligible endpoint the
request fails at once with ``NoHealthyEndpoint`` (503, reason no_healthy_endpoint).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable

import httpx

from ..config_upstreams import UpstreamConfig
from ..errors import NoHealthyEndpoint, Reason, StaleConnectionError, classify
from .attempt import PoolTransport, WrappedStream
from .discovery import DnsDiscovery
from .endpoints import CONNECT, RESET, STATUS, Endpoint, EndpointObserver, EndpointSet
from .health import HealthChecker
from .httpcore_compat import url_at
from .outlier import FAILING_STATUSES, OutlierDetector

log = logging.getLogger("relay.upstreams")

# The extension naming the endpoint an attempt went to (the access log's upstream_addr).
ENDPOINT_EXTENSION = "relay.endpoint"
Wrap = Callable[[str, httpx.AsyncBaseTransport], httpx.AsyncBaseTransport]
_CONNECT_REASONS = frozenset({Reason.CONNECT, Reason.CONNECT_TIMEOUT, Reason.TLS})


def _failure_kind(exc: BaseException) -> str | None:
    """What a failed attempt says about its endpoint (None: nothing)."""
    if isinstance(exc, StaleConnectionError):
        return None  # the keep-alive race: the gate retries it, not the endpoint's fault
    reason = classify(exc)
    if reason in _CONNECT_REASONS:
        return CONNECT
    if reason is Reason.RESET:
        return RESET
    return None


class _EndpointStream(WrappedStream):
    """The response body; closing it ends the request's time on its endpoint."""

    def __init__(
        self, inner: httpx.AsyncByteStream, done: Callable[[Endpoint], None], endpoint: Endpoint
    ) -> None:
        super().__init__(inner)
        self._done = done
        self._endpoint = endpoint

    async def _after_close(self) -> None:
        self._done(self._endpoint)


class BalancingTransport(PoolTransport):
    """Endpoint choice over the endpoints of one upstream (see the module docstring)."""

    cancel_safe = True  # per pool kind: see ``balancer_for``

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        make_pool: Callable[[], PoolTransport],
        observer: EndpointObserver,
        wrap: Wrap | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._make_pool = make_pool
        self._wrap = wrap
        self._scheme = config.url.scheme
        self.endpoints = EndpointSet(name, self._endpoint)
        self.outlier = OutlierDetector(config.outlier, self.endpoints, observer)
        self._observer = observer
        self._round_robin = config.balance == "round_robin"
        self._next = 0
        url = httpx.URL(str(config.url))
        # url's host is the TLS server name whatever address is connected to.
        self._sni = url.host if self._scheme == "https" else None
        self._tasks: list[asyncio.Task[None]] = []
        port = url.port or (443 if url.scheme == "https" else 80)
        self.discovery: DnsDiscovery | None = None
        if config.endpoints:
            self.endpoints.replace((e.host or "", e.port or 0) for e in config.endpoints)
        elif config.discovery.mode == "dns":
            self.discovery = DnsDiscovery(
                url.host, port, config.discovery, self.endpoints, observer
            )
        else:
            self.endpoints.replace([(url.host, port)])
        self.health: HealthChecker | None = None
        if config.health_check.path is not None:
            self.health = HealthChecker(
                config.health_check, self.endpoints, url.netloc, self._sni, observer
            )

    def _endpoint(self, host: str, port: int) -> Endpoint:
        pool = self._make_pool()
        send = pool if self._wrap is None else self._wrap(self.name, pool)
        return Endpoint(self._scheme, host, port, pool, send)

    # -- choice ------------------------------------------------------------------------
    def _pick(self, avoid: Endpoint | None = None) -> Endpoint | None:
        eligible = self.endpoints.eligible
        if avoid is not None:
            eligible = [e for e in eligible if e is not avoid]
        count = len(eligible)
        if count <= 1:
            return eligible[0] if count else None
        if self._round_robin:
            self._next = (self._next + 1) % count
            return eligible[self._next]
        first = random.randrange(count)
        second = random.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = eligible[first], eligible[second]
        return a if a.in_flight <= b.in_flight else b

    def choose(self) -> Endpoint | None:
        """An endpoint for a connection made outside the pools (a WebSocket session), by
        the same choice a request's is; None when none is healthy."""
        return self._pick()

    # -- sending -----------------------------------------------------------------------
    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        endpoint = self._pick()
        if endpoint is None:
            raise NoHealthyEndpoint(f"upstream {self.name} has no healthy endpoint")
        try:
            return await self._send(endpoint, request)
        except httpx.TransportError as exc:
            if _failure_kind(exc) != CONNECT:
                raise
            other = self._pick(avoid=endpoint)
            if other is None:
                raise
            # Nothing was sent: any method may go to another endpoint, once.
            log.debug(
                "upstream %s: %s failed to connect, trying %s",
                self.name,
                endpoint.address,
                other.address,
            )
            return await self._send(other, request)

    async def _send(self, endpoint: Endpoint, request: httpx.Request) -> httpx.Response:
        request.url = url_at(request.url, endpoint.host, endpoint.port)
        extensions = request.extensions
        extensions[ENDPOINT_EXTENSION] = endpoint.address
        if self._sni is not None and "sni_hostname" not in extensions:
            extensions["sni_hostname"] = self._sni
        endpoint.in_flight += 1
        try:
            response = await endpoint.send.handle_async_request(request)
        except BaseException as exc:
            self._done(endpoint)
            kind = _failure_kind(exc) if isinstance(exc, Exception) else None
            if kind is not None:
                self.outlier.failure(endpoint, kind)
            raise
        if response.status_code in FAILING_STATUSES:
            self.outlier.failure(endpoint, STATUS)
        else:
            self.outlier.success(endpoint)
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _EndpointStream(response.stream, self._done, endpoint)
        return response

    def _done(self, endpoint: Endpoint) -> None:
        endpoint.in_flight -= 1
        if endpoint.draining:
            self.endpoints.release(endpoint)

    # -- pool interface ------------------------------------------------------------------
    def idle_connections(self) -> int:
        return sum(e.pool.idle_connections() for e in self.endpoints)

    async def __aenter__(self) -> BalancingTransport:
        for endpoint in self.endpoints:
            await endpoint.pool.__aenter__()
        loop = asyncio.get_running_loop()
        if self.discovery is not None:
            # The first set before the first request (bounded by the resolver's lifetime);
            # until a resolution works, requests are answered 503 no_healthy_endpoint.
            await self.discovery.refresh()
            self._tasks.append(loop.create_task(self.discovery.run()))
        if self.health is not None:
            self._tasks.append(loop.create_task(self.health.run()))
        return self

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.endpoints.aclose()


class _FragileBalancingTransport(BalancingTransport):
    cancel_safe = False


def balancer_class(pool_cancel_safe: bool) -> type[BalancingTransport]:
    """The balancer over pools of that kind: the gate protects it as it would them."""
    return BalancingTransport if pool_cancel_safe else _FragileBalancingTransport
