"""Connection recycling against one address (the ClusterIP case): old connections close
only when idle, each counted, and no request fails."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.endpoints import get_many
from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.relays import StartRelay, pool_settled
from tests.support.scripted import ScriptedUpstream, delayed, respond

pytestmark = pytest.mark.usefixtures("no_error_logs")


@pytest.fixture
def transport() -> str:
    return "aiohttp"  # the pool with recycling (the config refuses it for httpcore)


async def test_max_requests_per_connection(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    upstream.handlers["/ok"] = respond(200, b"ok")
    relay = await relay_to(upstream.url, pool={"max_requests_per_connection": 3})
    assert await get_many(relay.url, 9) == [200] * 9
    # Three connections, three requests each: each closed after its third.
    assert [r.sequence for r in upstream.seen] == [0, 1, 2] * 3
    recycled = "relay_upstream_connections_recycled_total"
    assert await metric(relay, recycled, upstream="up", reason="requests") == 3
    assert await metric(relay, recycled, upstream="up", reason="age") == 0


async def test_max_connection_age_closes_old_connections_only_when_idle(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    upstream.handlers["/ok"] = respond(200, b"ok")
    upstream.handlers["/slow"] = delayed(0.3, respond(200, b"slow"))
    relay = await relay_to(upstream.url, pool={"max_connection_age_seconds": 0.1})
    recycled = "relay_upstream_connections_recycled_total"
    async with http_client(timeout=5) as client:
        # Outlives its connection's age while in flight: it is not cut.
        response = await client.get(f"{relay.url}/slow")
        assert (response.status_code, response.content) == (200, b"slow")
        assert await metric(relay, recycled, upstream="up", reason="age") == 1
        # Steady traffic: young connections are reused, old ones replaced.
        for _ in range(3):
            assert (await client.get(f"{relay.url}/ok")).status_code == 200
            assert (await client.get(f"{relay.url}/ok")).status_code == 200
            await asyncio.sleep(0.12)
    ok = [r for r in upstream.seen if r.path == "/ok"]
    assert [r.sequence for r in ok] == [0, 1] * 3
    assert await metric(relay, recycled, upstream="up", reason="age") >= 3
    assert pool_settled(relay)
