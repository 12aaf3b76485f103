"""Disconnect safety: whoever hangs up, the upstream response is closed, its pool slot is
released, and nothing is logged as an error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.harness import (
    Request,
    RunningRelay,
    ScriptedUpstream,
    Writer,
    delayed,
    endless_stream,
    eventually,
    hang,
    raw_request,
    reset_mid_body,
    respond,
    run_relay,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")


def pool_settled(relay: RunningRelay, name: str = "up") -> bool:
    snapshot = relay.relay.upstreams()[name].snapshot()
    return snapshot.in_use == 0 and snapshot.waiting == 0


async def raise_mid_stream(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"this is not a chunk size\r\n\r\n")
    await writer.drain()
    writer.close()


@pytest.fixture
async def relay(transport: str) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    upstream = ScriptedUpstream(
        {
            "/hang": hang,
            "/stream": endless_stream,
            "/reset": reset_mid_body,
            "/bad-chunk": raise_mid_stream,
            "/ok": respond(200, b"ok"),
        }
    )
    async with upstream.running():
        config: dict[str, Any] = {
            "upstreams": {"up": {"url": upstream.url, "transport": transport}},
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as running:
            yield running, upstream


async def test_client_gone_before_upstream_headers(
    relay: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = relay
    await raw_request(running.url, "/hang", hang_up_when=lambda: len(upstream.seen) == 1)
    await eventually(lambda: pool_settled(running))
    # The proxy closed its upstream connection: the upstream's handler saw it go.
    await eventually(lambda: upstream.closed_connections == 1)
    async with httpx.AsyncClient() as client:
        assert (await client.get(f"{running.url}/ok")).status_code == 200


async def test_client_gone_mid_body(relay: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = relay
    for _ in range(3):
        await raw_request(running.url, "/stream", read_bytes=4000)
    await eventually(lambda: pool_settled(running))
    await eventually(lambda: upstream.closed_connections == 3)
    snapshot = running.relay.upstreams()["up"].snapshot()
    assert snapshot.idle == 0  # a partly read connection is closed, never pooled


@pytest.mark.parametrize("path", ["/reset", "/bad-chunk"])
async def test_upstream_fails_mid_stream(
    relay: tuple[RunningRelay, ScriptedUpstream], path: str
) -> None:
    running, _ = relay
    async with httpx.AsyncClient() as client:
        async with client.stream("GET", f"{running.url}{path}") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.HTTPError):
                await response.aread()
        await eventually(lambda: pool_settled(running))
        # One bad exchange does not affect the next.
        assert (await client.get(f"{running.url}/ok")).content == b"ok"


async def test_cancelled_waiters_never_leak_pool_slots(transport: str) -> None:
    """encode/httpcore#1093: cancelling requests queued for a pool slot must not leak it."""
    upstream = ScriptedUpstream({"/slow": delayed(0.3, respond(200, b"ok"))})
    async with upstream.running():
        config = {
            "upstreams": {
                "up": {
                    "url": upstream.url,
                    "transport": transport,
                    "pool": {"max_connections": 2, "max_keepalive_connections": 2},
                    "timeouts": {"pool": 5},
                }
            },
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as running:
            async with httpx.AsyncClient(timeout=0.15) as client:
                # 30 clients that give up while most of them are queued for 2 slots.
                results = await asyncio.gather(
                    *(client.get(f"{running.url}/slow") for _ in range(30)),
                    return_exceptions=True,
                )
            assert all(isinstance(r, httpx.TimeoutException) for r in results)
            await eventually(lambda: pool_settled(running), within=10)
            async with httpx.AsyncClient(timeout=10) as client:
                responses = await asyncio.gather(
                    *(client.get(f"{running.url}/slow") for _ in range(4))
                )
            assert [r.status_code for r in responses] == [200] * 4
            assert pool_settled(running)
