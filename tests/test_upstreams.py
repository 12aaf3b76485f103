"""The pool gate and the stale keep-alive retry policy."""

from __future__ import annotations

import httpx
import pytest

from tests.harness import ScriptedUpstream, respond, run_relay, stale_after_first

pytestmark = pytest.mark.usefixtures("no_error_logs")


async def retries_counted(admin_url: str) -> float:
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"{admin_url}/metrics")).text
    for line in text.splitlines():
        if line.startswith('relay_upstream_retries_total{upstream="up"}'):
            return float(line.split()[-1])
    return 0.0


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE"])
async def test_idempotent_request_retried_once_on_stale_connection(
    transport: str, method: str
) -> None:
    upstream = ScriptedUpstream({"/s": stale_after_first()})
    async with upstream.running():
        config = {
            "upstreams": {"up": {"url": upstream.url, "transport": transport}},
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as relay, httpx.AsyncClient() as client:
            assert (await client.get(f"{relay.url}/s")).status_code == 200
            # The pooled connection is reused, the upstream drops it without answering,
            # and the proxy replays the request on a new connection.
            assert (await client.request(method, f"{relay.url}/s")).status_code == 200
            assert await retries_counted(relay.admin_url) == 1
    assert [r.method for r in upstream.seen] == ["GET", method, method]


@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_non_idempotent_request_is_never_retried(transport: str, method: str) -> None:
    upstream = ScriptedUpstream({"/s": stale_after_first()})
    async with upstream.running():
        config = {
            "upstreams": {"up": {"url": upstream.url, "transport": transport}},
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as relay, httpx.AsyncClient() as client:
            assert (await client.get(f"{relay.url}/s")).status_code == 200
            response = await client.request(method, f"{relay.url}/s", content=b"once")
            assert response.status_code == 502
            assert response.headers["proxy-status"].startswith("relay; error=connection_terminated")
            assert await retries_counted(relay.admin_url) == 0
    assert [r.method for r in upstream.seen] == ["GET", method]


async def test_fresh_connection_closed_is_not_retried(transport: str) -> None:
    async def close(request: object, writer: object) -> None:
        writer.close()  # type: ignore[attr-defined]

    upstream = ScriptedUpstream({"/s": close, "/ok": respond(200, b"ok")})
    async with upstream.running():
        config = {
            "upstreams": {"up": {"url": upstream.url, "transport": transport}},
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        async with run_relay(config) as relay, httpx.AsyncClient() as client:
            assert (await client.get(f"{relay.url}/s")).status_code == 502
            assert await retries_counted(relay.admin_url) == 0
    assert len(upstream.seen) == 1
