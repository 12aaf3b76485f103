"""Clients that give up at random moments never cost the pool a connection.

Cancellations land anywhere: while waiting for a slot, while the request is written, while
headers are read, while the body is read or the response is closed. httpcore loses its
connections to some of those (encode/httpcore#1093); the gate must keep it whole.
"""

from __future__ import annotations

import asyncio
import random
import time
from contextlib import AsyncExitStack

import httpx
import pytest

from service.config_upstreams import UpstreamConfig
from service.upstreams.gated import NullPoolObserver
from service.upstreams.pools import Upstream
from tests.support.http import http_client
from tests.support.net import eventually
from tests.support.relays import pool_settled, run_relay
from tests.support.scripted import ScriptedUpstream, respond

CHURN_SECONDS = 2.0


async def churn(call: object, loops: int = 20, max_wait: float = 0.02) -> int:
    assert callable(call)
    gave_up = 0
    end = time.monotonic() + CHURN_SECONDS
    rng = random.Random(1093)

    async def loop() -> None:
        nonlocal gave_up
        while time.monotonic() < end:
            try:
                await asyncio.wait_for(call(), rng.uniform(0, max_wait))
            except TimeoutError:
                gave_up += 1
            except httpx.HTTPError:
                pass

    await asyncio.gather(*(loop() for _ in range(loops)))
    return gave_up


async def test_pool_survives_cancellation_churn_in_process(transport: str) -> None:
    upstream = ScriptedUpstream({"/": respond(200, b"ok")})
    async with upstream.running():
        config = UpstreamConfig.model_validate(
            {
                "url": upstream.url,
                "transport": transport,
                "pool": {"max_connections": 4, "max_keepalive_connections": 4},
                "timeouts": {"pool": 2},
            }
        )
        pool = Upstream("up", config, NullPoolObserver())
        async with pool.client as client:
            gave_up = await churn(lambda: client.get(f"{upstream.url}/"))
            assert gave_up > 100, "the churn must actually cancel requests"
            await eventually(lambda: pool.snapshot().in_use == 0, within=10)
            responses = await asyncio.wait_for(
                asyncio.gather(*(client.get(f"{upstream.url}/") for _ in range(4))), 5
            )
            assert [r.status_code for r in responses] == [200] * 4
            assert pool.snapshot().waiting == 0


@pytest.mark.usefixtures("no_error_logs")
@pytest.mark.parametrize("layout", ["url", "endpoints"])
async def test_proxy_survives_clients_hanging_up_at_random(transport: str, layout: str) -> None:
    """By the upstream's url, or over two endpoints (two loopback addresses of one server):
    every pool, per endpoint and per upstream, back to idle."""
    upstream = ScriptedUpstream({"/": respond(200, b"ok" * 500)})
    async with upstream.running(), AsyncExitStack() as stack:
        extra: dict[str, object] = {}
        if layout == "endpoints":
            extra["endpoints"] = [
                upstream.url,
                await stack.enter_async_context(upstream.also_on("127.0.0.2")),
            ]
        config = {
            "upstreams": {
                "up": {
                    "url": upstream.url,
                    "transport": transport,
                    "pool": {"max_connections": 4, "max_keepalive_connections": 4},
                    "timeouts": {"pool": 2},
                    **extra,
                }
            },
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as relay:
            async with http_client(base_url=relay.url) as client:
                gave_up = await churn(lambda: client.get("/"), loops=16, max_wait=0.03)
            assert gave_up > 50
            snapshot = relay.relay.upstreams()["up"].snapshot
            await eventually(lambda: pool_settled(relay), within=10)
            async with http_client(base_url=relay.url, timeout=5) as client:
                responses = await asyncio.gather(*(client.get("/") for _ in range(4)))
            assert [r.status_code for r in responses] == [200] * 4
            assert snapshot().waiting == 0
