"""Upstreams: one pooled ``httpx.AsyncClient`` each, built from its config with the pool
(aiohttp's or httpcore's, or a balancer over endpoints) behind the admission gate
(gated.py), and the set of them the app opens in its lifespan and closes at shutdown."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import httpx

from ..config_upstreams import UpstreamConfig
from .aiohttp_pool import AiohttpTransport, SharedResolver
from .attempt import PoolTransport
from .balance import ENDPOINT_EXTENSION, BalancingTransport, balancer_class
from .client import UpstreamClient
from .endpoints import EndpointObserver, NullEndpointObserver
from .gated import (
    NO_BODY,
    Body,
    GatedTransport,
    NullPoolObserver,
    PoolObserver,
    PoolSnapshot,
    TransportWrapper,
)
from .httpcore_pool import HttpcoreTransport
from .recycling import Recycling
from .tls import TlsSource, server_name, upstream_tls


class Upstream:
    """A named upstream: its config, its one client and its pool gate."""

    def __init__(
        self,
        name: str,
        config: UpstreamConfig,
        observer: PoolObserver,
        wrap: TransportWrapper | None = None,
        resolver: SharedResolver | None = None,
        endpoint_observer: EndpointObserver | None = None,
    ) -> None:
        """``resolver``: the DNS resolver its pool shares with other upstreams' (aiohttp)."""
        self.name = name
        self.config = config
        url = httpx.URL(str(config.url))
        self.base_url = url
        # Requests' URLs are parsed from this plus the target: httpx parses a whole URL
        # string in less than two thirds of what URL.copy_with costs (it validates each
        # component it is given on its own, then the URL again).
        self._origin = f"{url.scheme}://{url.netloc.decode('ascii')}"
        self.base_path = url.raw_path.split(b"?", 1)[0].rstrip(b"/")
        self.authority: bytes = url.netloc
        port = url.port or (443 if url.scheme == "https" else 80)
        self._address = f"{url.raw_host.decode('ascii')}:{port}"
        limits = httpx.Limits(
            max_connections=config.pool.max_connections,
            max_keepalive_connections=config.pool.max_keepalive_connections,
            keepalive_expiry=config.pool.keepalive_expiry_seconds,
        )
        tls = self.tls = upstream_tls(config)
        self._sni = server_name(config)  # sent as httpcore's extension; aiohttp's pool reads it
        endpoint_observer = endpoint_observer or NullEndpointObserver()
        recycling = Recycling.of(
            config.pool, functools.partial(endpoint_observer.connection_recycled, name)
        )

        def make_pool() -> PoolTransport:
            if config.transport == "aiohttp":
                return AiohttpTransport(
                    limits=limits, tls=tls, resolver=resolver, recycling=recycling
                )
            return HttpcoreTransport(limits=limits, tls=tls, trust_env=False)

        inner: PoolTransport
        # Many endpoints: the balancer, with a pool (and client spans) per endpoint, below
        # the one gate of the upstream (README, *Endpoints*); one: the pool itself.
        self.balancer: BalancingTransport | None = None
        if config.balanced:
            cancel_safe = config.transport == "aiohttp"
            inner = self.balancer = balancer_class(cancel_safe)(
                name, config, make_pool, endpoint_observer, wrap
            )
            wrap = None
        else:
            inner = make_pool()
        self.transport = GatedTransport(
            name,
            inner,
            max_connections=config.pool.max_connections,
            pool_timeout=config.timeouts.pool,
            max_waiting=config.pool.max_waiting,
            observer=observer,
            wrap=wrap,
            retry_connect=self.balancer is None,
        )
        t = config.timeouts
        self.client = UpstreamClient(
            transport=self.transport,
            timeout=httpx.Timeout(connect=t.connect, read=t.read, write=t.write, pool=t.pool),
        )
        self.timeouts: dict[str, float | None] = self.client.timeout.as_dict()

    def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: Body | None,
        timeouts: dict[str, float | None] | None = None,
    ) -> httpx.Request:
        """The upstream request: ``target`` is the raw path and query, sent as is;
        ``timeouts``: a route's own, in place of the upstream's (httpx's names, pool too).

        Built with ``stream=`` always, as httpx documents for requests made on the server
        side of its transport API: the headers are exactly the ones given, with nothing
        added (no Host or Content-Length of httpx's choosing), and httpx does not build
        its header map a second time to add them.
        """
        url = httpx.URL(self._origin + target.decode("ascii"))
        extensions: dict[str, Any] = {"timeout": timeouts or self.timeouts}
        if self._sni is not None:
            extensions["sni_hostname"] = self._sni
        if body is None:
            return httpx.Request(
                method, url, headers=headers, stream=NO_BODY, extensions=extensions
            )
        if not any(name == b"content-length" for name, _ in headers):
            # The framing httpx itself would choose for a stream of unknown length.
            headers = [*headers, (b"transfer-encoding", b"chunked")]
        return httpx.Request(method, url, headers=headers, stream=body, extensions=extensions)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send through the upstream's client and its transport chain (gate, retry,
        tracing, pool); the response streams, and closing it returns the connection and
        the gate slot."""
        return await self.client.send(request, stream=True)

    def snapshot(self) -> PoolSnapshot:
        return self.transport.snapshot()

    def address_of(self, request: httpx.Request) -> str | None:
        """The endpoint ``request`` went to (the access log's ``upstream_addr``): url's
        host and port for a single pool, None if no endpoint could be chosen."""
        if self.balancer is None:
            return self._address
        address: str | None = request.extensions.get(ENDPOINT_EXTENSION)
        return address

    def endpoints_view(self) -> dict[str, Any]:
        """This upstream's endpoints as the admin ``/upstreams`` shows them."""
        config = self.config
        view: dict[str, Any] = {
            "url": str(config.url),
            "balance": config.balance,
            "discovery": config.discovery.mode,
        }
        if self.balancer is None:
            snap = self.snapshot()
            view["endpoints"] = [
                {
                    "address": self._address,
                    "state": "healthy",
                    "in_flight": snap.in_use,
                    "pool": {"in_use": snap.in_use, "idle": snap.idle},
                    "consecutive_failures": 0,
                    "ejected_until": None,
                }
            ]
        else:
            view["endpoints"] = [e.view() for e in self.balancer.endpoints]
        return view


class UpstreamSet:
    """All upstream clients, opened together in the lifespan and closed together."""

    def __init__(
        self,
        configs: Mapping[str, UpstreamConfig],
        observer: PoolObserver | None = None,
        wrap: TransportWrapper | None = None,
        endpoint_observer: EndpointObserver | None = None,
    ) -> None:
        obs = observer or NullPoolObserver()
        self.resolver = SharedResolver()
        self._upstreams = {
            name: Upstream(name, cfg, obs, wrap, self.resolver, endpoint_observer)
            for name, cfg in configs.items()
        }

    def __getitem__(self, name: str) -> Upstream:
        return self._upstreams[name]

    def values(self) -> list[Upstream]:
        return list(self._upstreams.values())

    def snapshots(self) -> list[PoolSnapshot]:
        return [u.snapshot() for u in self._upstreams.values()]

    def tls_sources(self) -> dict[TlsSource, list[str]]:
        """The sources whose files are watched, each with the upstreams using it."""
        found: dict[TlsSource, list[str]] = {}
        for name, upstream in self._upstreams.items():
            if upstream.tls.watched:
                found.setdefault(upstream.tls, []).append(name)
        return found

    async def open(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.client.__aenter__()
        if any(u.config.transport == "aiohttp" for u in self._upstreams.values()):
            self.resolver.get()  # at start: see SharedResolver

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.client.aclose()
        await self.resolver.close()
