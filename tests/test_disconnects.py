"""Disconnect safety, both transports: whoever hangs up, the upstream response is closed,
its pool slot is released, the upstream sees its connection go, and nothing is logged as
an error (the ``no_error_logs`` fixture watches every logger, uvicorn.error included)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

import httpx
import pytest

from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.net import eventually, unaccepting_listener
from tests.support.relays import RunningRelay, one_upstream, pool_settled, run_relay
from tests.support.scripted import (
    Request,
    ScriptedUpstream,
    Writer,
    delayed,
    endless_stream,
    hang,
    reset_mid_body,
    respond,
)
from tests.support.wire import connect, raw_request

pytestmark = pytest.mark.usefixtures("no_error_logs")


async def raise_mid_stream(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"this is not a chunk size\r\n\r\n")
    await writer.drain()
    await hang(request, writer)  # until the proxy closes the connection


@pytest.fixture(params=["url", "endpoints"])
async def relay(
    transport: str, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    """The proxy in front of one scripted upstream: by its url, or as an upstream of two
    endpoints (two loopback addresses of the same server, behind the balancer)."""
    upstream = ScriptedUpstream(
        {
            "/hang": hang,
            "/stream": endless_stream,
            "/reset": reset_mid_body,
            "/bad-chunk": raise_mid_stream,
            "/upload": respond(200, b"uploaded"),
            "/ok": respond(200, b"ok"),
        }
    )
    # One connection: a single leaked slot (in the gate or in the transport's own pool)
    # and still_serves() gets a 503 instead of its answer.
    pool = {"max_connections": 1, "max_keepalive_connections": 1}
    async with upstream.running(), AsyncExitStack() as stack:
        extra: dict[str, object] = {}
        if request.param == "endpoints":
            second = await stack.enter_async_context(upstream.also_on("127.0.0.2"))
            extra["endpoints"] = [upstream.url, second]
        config = one_upstream(upstream.url, transport, pool=pool, timeouts={"pool": 2}, **extra)
        async with run_relay(config) as running:
            yield running, upstream


async def still_serves(relay: RunningRelay) -> None:
    async with http_client(timeout=5) as client:
        response = await client.get(f"{relay.url}/ok")
    assert response.content == b"ok"


async def test_client_gone_before_upstream_headers(
    relay: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = relay
    await raw_request(running.url, "/hang", hang_up_when=lambda: len(upstream.seen) == 1)
    await eventually(lambda: pool_settled(running))
    # The proxy closed its upstream connection: the upstream's handler saw it go.
    await eventually(lambda: upstream.closed_connections == 1)
    await still_serves(running)


async def test_client_gone_while_connecting(transport: str) -> None:
    with unaccepting_listener() as port:
        config = one_upstream(
            f"http://127.0.0.1:{port}",
            transport,
            pool={"max_connections": 1, "max_keepalive_connections": 1},
            timeouts={"connect": 1, "pool": 0.3},
        )
        async with run_relay(config) as running:
            up = running.relay.upstreams()["up"]
            await raw_request(running.url, "/x", hang_up_when=lambda: up.snapshot().in_use == 1)
            await eventually(lambda: pool_settled(running))
            # The one slot is free: the next request gets its own connect attempt (and its
            # timeout), not a 503 for a pool still held by the abandoned one.
            async with http_client(timeout=10) as client:
                response = await client.get(f"{running.url}/x")
            assert response.status_code == 504
            assert "error=connection_timeout" in response.headers["proxy-status"]


async def test_client_gone_mid_body(relay: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = relay
    for _ in range(3):
        await raw_request(running.url, "/stream", read_bytes=4000)
    await eventually(lambda: pool_settled(running))
    # Each abandoned stream's connection was closed (the upstream stopped writing), never
    # returned to the pool with half a body in it.
    await eventually(lambda: upstream.closed_connections == 3)
    assert running.relay.upstreams()["up"].snapshot().idle == 0
    await still_serves(running)


async def test_client_gone_mid_upload(relay: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = relay
    _, writer = await connect(running.url)
    writer.write(b"POST /upload HTTP/1.1\r\nhost: t\r\ncontent-length: 1000000\r\n\r\n")
    writer.write(b"u" * 100_000)
    await writer.drain()
    await eventually(lambda: running.relay.upstreams()["up"].snapshot().in_use == 1)
    writer.transport.abort()
    await eventually(lambda: pool_settled(running))
    # The upstream never got a complete request, and its connection was closed.
    await eventually(lambda: upstream.closed_connections == 1)
    assert upstream.seen == []
    # Counted as the client hanging up, not as an upstream failure.
    assert await metric(running, "relay_disconnects_total", side="client") == 1
    assert await metric(running, "relay_upstream_errors_total") == 0
    await still_serves(running)


@pytest.mark.parametrize("path", ["/reset", "/bad-chunk"])
async def test_upstream_fails_mid_stream(
    relay: tuple[RunningRelay, ScriptedUpstream], path: str
) -> None:
    running, upstream = relay
    async with http_client(timeout=10) as client:
        async with client.stream("GET", f"{running.url}{path}") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await asyncio.wait_for(response.aread(), 3)
            # Settled while the client is still connected: the proxy let go by itself.
            await eventually(lambda: pool_settled(running))
        assert (await client.get(f"{running.url}/ok")).content == b"ok"
    # The failed connection was dropped; /ok needed a connection of its own.
    await eventually(lambda: upstream.closed_connections >= 1)
    assert running.relay.upstreams()["up"].snapshot().idle == 1


@pytest.mark.parametrize("how", ["abort-sockets", "cancel-clients"])
async def test_cancelled_waiters_never_leak_pool_slots(transport: str, how: str) -> None:
    """encode/httpcore#1093: clients that go away while queued for a pool slot (and the two
    that hold one) must not leak any slot, in the gate or in the transport's own pool."""
    upstream = ScriptedUpstream({"/hang": hang, "/slow": delayed(0.2, respond(200, b"ok"))})
    pool = {"max_connections": 2, "max_keepalive_connections": 2}
    async with upstream.running():
        config = one_upstream(upstream.url, transport, pool=pool, timeouts={"pool": 3})
        async with run_relay(config) as running:
            gate = running.relay.upstreams()["up"]
            give_up = asyncio.Event()
            client = http_client(timeout=30)

            async def one_client() -> None:
                if how == "abort-sockets":
                    await raw_request(running.url, "/hang", hang_up_when=give_up.is_set)
                else:
                    await client.get(f"{running.url}/hang")

            clients = [asyncio.create_task(one_client()) for _ in range(30)]
            # Two hold a connection, 28 queue for one: then every client gives up at once.
            await eventually(lambda: (gate.snapshot().in_use, gate.snapshot().waiting) == (2, 28))
            await eventually(lambda: len(upstream.seen) == 2)
            give_up.set()
            if how == "cancel-clients":
                for task in clients:
                    task.cancel()
            results = await asyncio.gather(*clients, return_exceptions=True)
            await client.aclose()
            assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
            await eventually(lambda: pool_settled(running))
            # The two connections that carried a request are closed, and any a queued waiter
            # had just opened when its client went (it carried none) is closed or idle.
            await eventually(
                lambda: (
                    upstream.closed_connections >= 2
                    and upstream.open_connections == gate.snapshot().idle
                )
            )
            assert len(upstream.seen) == 2  # the queued requests never reached it

            # Both slots really are free again: twice the pool size, all served in time.
            async with http_client(timeout=10) as fresh:
                responses = await asyncio.gather(
                    *(fresh.get(f"{running.url}/slow") for _ in range(4))
                )
            assert [r.status_code for r in responses] == [200] * 4
            assert pool_settled(running)
