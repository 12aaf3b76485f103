"""The pool gate (exact in-use and waiting counts, never more connections than allowed, no
leak) and the stale keep-alive retry policy, for both transports."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.net import eventually
from tests.support.relays import RunningRelay, StartRelay, pool_settled
from tests.support.scripted import (
    Request,
    ScriptedUpstream,
    Writer,
    delayed,
    hang,
    respond,
    stale_after_first,
)
from tests.support.wire import raw_request

pytestmark = pytest.mark.usefixtures("no_error_logs")


def pool_of(size: int, keepalive: int | None = None) -> dict[str, int]:
    idle = size if keepalive is None else keepalive
    return {"max_connections": size, "max_keepalive_connections": idle}


async def test_gate_snapshot_counts_holders_and_waiters(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    upstream.handlers |= {"/hang": hang, "/ok": respond(200, b"ok")}
    relay = await relay_to(upstream.url, pool=pool_of(3), timeouts={"pool": 10})
    up = relay.relay.upstreams()["up"]
    assert (up.snapshot().in_use, up.snapshot().waiting, up.snapshot().max) == (0, 0, 3)
    give_up = asyncio.Event()
    clients = [
        asyncio.create_task(raw_request(relay.url, "/hang", hang_up_when=give_up.is_set))
        for _ in range(5)
    ]
    await eventually(lambda: (up.snapshot().in_use, up.snapshot().waiting) == (3, 2))
    await eventually(lambda: upstream.open_connections == 3)
    assert await metric(relay, "relay_pool_waiting_requests", upstream="up") == 2
    give_up.set()
    await asyncio.gather(*clients)
    await eventually(lambda: pool_settled(relay))
    await eventually(lambda: upstream.open_connections == 0)
    async with http_client(timeout=5) as client:
        assert (await client.get(f"{relay.url}/ok")).content == b"ok"
    assert upstream.peak_connections == 3


async def test_never_more_upstream_connections_than_the_pool_allows(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    upstream.handlers["/slow"] = delayed(0.1, respond(200, b"ok"))
    relay = await relay_to(upstream.url, pool=pool_of(2), timeouts={"pool": 10})
    async with http_client(timeout=10) as client:
        # 12 requests at once for 2 connections: queued, not refused, all served.
        responses = await asyncio.gather(*(client.get(f"{relay.url}/slow") for _ in range(12)))
    assert [r.status_code for r in responses] == [200] * 12
    assert pool_settled(relay)
    assert relay.relay.upstreams()["up"].snapshot().idle == 2
    assert upstream.peak_connections == 2
    assert len(upstream.seen) == 12


@pytest.mark.parametrize("keepalive", [0, 1, 4])
async def test_idle_connections_kept_up_to_max_keepalive(
    upstream: ScriptedUpstream, relay_to: StartRelay, keepalive: int
) -> None:
    upstream.handlers["/slow"] = delayed(0.1, respond(200, b"ok"))
    relay = await relay_to(upstream.url, pool=pool_of(4, keepalive))
    async with http_client(timeout=10) as client:
        await asyncio.gather(*(client.get(f"{relay.url}/slow") for _ in range(4)))
    assert upstream.peak_connections == 4
    await eventually(lambda: upstream.open_connections == keepalive)
    assert relay.relay.upstreams()["up"].snapshot().idle == keepalive


async def retries(relay: RunningRelay) -> float:
    return await metric(relay, "relay_upstream_retries_total", upstream="up")


@pytest.mark.parametrize("close", ["fin", "rst"])
@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
async def test_idempotent_request_retried_once_on_stale_connection(
    upstream: ScriptedUpstream, relay_to: StartRelay, transport: str, method: str, close: str
) -> None:
    upstream.handlers["/s"] = stale_after_first(reset=close == "rst")
    relay = await relay_to(upstream.url)
    async with http_client() as client:
        assert (await client.get(f"{relay.url}/s")).status_code == 200
        # The pooled connection is reused, the upstream drops it without answering,
        # and the proxy replays the request once, on a new connection.
        assert (await client.request(method, f"{relay.url}/s")).status_code == 200
    assert await retries(relay) == 1
    assert pool_settled(relay)
    assert [r.method for r in upstream.seen] == ["GET", method, method]
    # The stale one; with httpcore also the retry's own connection, which is never pooled.
    closed = 1 if transport == "aiohttp" else 2
    await eventually(lambda: upstream.closed_connections == closed)
    assert upstream.peak_connections == 1  # the retry's connection came after it


@pytest.mark.parametrize("close", ["fin", "rst"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_is_never_retried(
    upstream: ScriptedUpstream, relay_to: StartRelay, method: str, close: str
) -> None:
    upstream.handlers["/s"] = stale_after_first(reset=close == "rst")
    relay = await relay_to(upstream.url)
    async with http_client() as client:
        assert (await client.get(f"{relay.url}/s")).status_code == 200
        response = await client.request(method, f"{relay.url}/s", content=b"once")
    assert response.status_code == 502
    assert response.headers["proxy-status"] == 'relay; error=connection_terminated; next-hop="up"'
    assert await retries(relay) == 0
    assert [(r.method, r.body) for r in upstream.seen] == [("GET", b""), (method, b"once")]


async def test_idempotent_request_with_a_body_is_not_replayed(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    """A streamed body cannot be sent twice: a PUT on a stale connection is not retried."""
    upstream.handlers["/s"] = stale_after_first()
    relay = await relay_to(upstream.url)
    async with http_client() as client:
        assert (await client.get(f"{relay.url}/s")).status_code == 200
        response = await client.put(f"{relay.url}/s", content=b"body")
    assert response.status_code == 502
    assert await retries(relay) == 0
    assert [r.method for r in upstream.seen] == ["GET", "PUT"]


async def test_fresh_connection_closed_is_not_retried(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    async def close(request: Request, writer: Writer) -> None:
        writer.close()

    upstream.handlers |= {"/s": close, "/ok": respond(200, b"ok")}
    relay = await relay_to(upstream.url)
    async with http_client() as client:
        assert (await client.get(f"{relay.url}/s")).status_code == 502
        assert (await client.get(f"{relay.url}/ok")).status_code == 200
    assert await retries(relay) == 0
    assert [r.path for r in upstream.seen] == ["/s", "/ok"]


def test_upstreams_share_one_tls_context_per_distinct_setting(tmp_path: Path) -> None:
    """Loading the CA bundle costs about 20 ms of CPU and 0.8 MB: once per process and
    setting, not once per upstream, nor per fresh-connection retry of the httpcore pool; and
    none at all for plain-HTTP upstreams. Upstreams naming the same files share one source
    (one poll of the files, one swap on rotation)."""
    import ssl

    import trustme

    from service.config_upstreams import UpstreamConfig
    from service.upstreams.aiohttp_pool import AiohttpTransport
    from service.upstreams.gated import NullPoolObserver
    from service.upstreams.httpcore_pool import HttpcoreTransport
    from service.upstreams.pools import Upstream
    from service.upstreams.tls import TlsSettings, tls_context, tls_source

    tls_source.cache_clear()

    def context_of(url: str, transport: str, verify: bool = True, **tls: Any) -> ssl.SSLContext:
        config = UpstreamConfig(url=url, transport=transport, tls={"verify": verify, **tls})
        inner = Upstream("u", config, NullPoolObserver()).transport.inner
        assert isinstance(inner, AiohttpTransport | HttpcoreTransport)
        return inner._tls.context

    for transport in ("aiohttp", "httpcore"):
        for n in range(3):
            plain = context_of(f"http://plain{n}.test:8080", transport)
            assert plain is tls_context(TlsSettings(verify=False))
    assert tls_source.cache_info().currsize == 1  # no CA bundle loaded for plain HTTP
    verifying = {
        id(context_of(f"https://{n}.test", t)) for n in "abc" for t in ("aiohttp", "httpcore")
    }
    unverified = {
        id(context_of(f"https://{n}.test", t, verify=False))
        for n in "abc"
        for t in ("aiohttp", "httpcore")
    }
    assert len(verifying) == len(unverified) == 1
    assert verifying != unverified
    assert tls_context(TlsSettings(verify=True)).verify_mode == ssl.CERT_REQUIRED
    assert tls_context(TlsSettings(verify=False)).verify_mode == ssl.CERT_NONE
    assert tls_source.cache_info().currsize == 2
    ca = trustme.CA()
    for name in ("one.pem", "two.pem"):
        ca.cert_pem.write_to_path(str(tmp_path / name))
    private = {
        id(context_of(f"https://{n}.test", t, ca_file=tmp_path / "one.pem"))
        for n in "abc"
        for t in ("aiohttp", "httpcore")
    }
    other = context_of("https://d.test", "aiohttp", ca_file=tmp_path / "two.pem")
    assert len(private) == 1
    assert id(other) not in private | verifying
    assert tls_source.cache_info().currsize == 4


async def test_aiohttp_pools_share_one_resolver() -> None:
    """aiohttp would give each upstream's pool a resolver of its own; a pool opens on its
    upstream's first request."""
    from service.config_upstreams import UpstreamConfig
    from service.upstreams.aiohttp_pool import AiohttpTransport
    from service.upstreams.pools import UpstreamSet

    server = ScriptedUpstream({"/": respond(200, b"ok")})
    async with server.running():
        configs = {f"u{n}": UpstreamConfig(url=server.url) for n in range(3)}
        upstreams = UpstreamSet(configs)
        await upstreams.open()
        try:
            resolvers = set()
            for upstream in upstreams.values():
                inner = upstream.transport.inner
                assert isinstance(inner, AiohttpTransport) and inner._session is None
                response = await upstream.send(upstream.request("GET", b"/", [], None))
                assert await response.aread() == b"ok"
                await response.aclose()
                assert inner._session is not None
                resolvers.add(id(inner._session.connector._resolver))  # type: ignore[union-attr]
            assert resolvers == {id(upstreams.resolver.get())}
        finally:
            await upstreams.close()
