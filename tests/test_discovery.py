"""DNS discovery against a DNS server the test runs on 127.0.0.1: endpoints follow the
records within refresh_seconds, a removed one drains (its streams finish, new requests
avoid it), and failed resolutions keep the last set."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.support.dns_server import DnsServer
from tests.support.endpoints import Pod, balanced_upstream, get_many, pods, states
from tests.support.http import http_client
from tests.support.metrics import metric
from tests.support.net import eventually
from tests.support.relays import RunningRelay, run_relay
from tests.support.scripted import Request, Writer, respond

pytestmark = pytest.mark.usefixtures("no_error_logs")

NAME = "api.relay.test"
REFRESH = 0.1


@pytest.fixture
async def dns_server() -> AsyncIterator[DnsServer]:
    async with DnsServer().running() as server:
        yield server


def discovered(server: DnsServer, port: int, **upstream: Any) -> dict[str, Any]:
    return balanced_upstream(
        f"http://{NAME}:{port}",
        discovery={
            "mode": "dns",
            "refresh_seconds": REFRESH,
            "nameservers": [server.nameserver],
        },
        **upstream,
    )


async def reaches(relay: RunningRelay, pod: Pod, within: float = 5.0) -> None:
    """Send requests until one reaches ``pod`` (bounded in count and time)."""
    before = pod.hits
    async with http_client(timeout=5) as client:
        for _ in range(int(within / 0.02)):
            assert (await client.get(f"{relay.url}/ok")).status_code == 200
            if pod.hits > before:
                return
            await asyncio.sleep(0.02)
    raise AssertionError(f"no request reached {pod.address}")


async def test_endpoints_follow_the_dns_records(dns_server: DnsServer) -> None:
    async with pods({"/ok": respond(200, b"ok")}) as (first, second, third):
        dns_server.records[NAME] = [first.host, second.host]
        async with run_relay(discovered(dns_server, first.port)) as relay:
            assert await get_many(relay.url, 20) == [200] * 20
            assert first.hits and second.hits and not third.hits
            assert set(await states(relay.admin_url)) == {first.address, second.address}
            dns_server.records[NAME].append(third.host)
            await reaches(relay, third)
            assert await metric(relay, "relay_upstream_endpoints", state="healthy") == 3
            assert (
                await metric(relay, "relay_upstream_discovery_refreshes_total", result="success")
                >= 2
            )
            # Every request carried url's Host, whichever address it went to.
            assert {r.headers["host"] for r in third.server.seen} == {f"{NAME}:{first.port}"}


async def test_a_removed_endpoint_drains(dns_server: DnsServer, transport: str) -> None:
    release = asyncio.Event()

    async def stream(request: Request, writer: Writer) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nabc")
        await writer.drain()
        await release.wait()
        writer.write(b"def")
        await writer.drain()

    handlers = {"/ok": respond(200, b"ok"), "/stream": stream}
    async with pods(handlers, ("127.0.0.2", "127.0.0.3")) as (kept, removed):
        dns_server.records[NAME] = [kept.host, removed.host]
        config = discovered(dns_server, kept.port, transport=transport)
        async with run_relay(config) as relay:
            async with http_client(timeout=10) as client:

                async def download() -> tuple[int, bytes]:
                    response = await client.get(f"{relay.url}/stream")
                    return response.status_code, response.content

                # Least request over two: three streams on each.
                streams = [asyncio.create_task(download()) for _ in range(6)]
                await eventually(lambda: removed.hits == 3 and kept.hits == 3)
                dns_server.records[NAME] = [kept.host]
                await eventually(lambda: draining(relay) == {removed.address})
                assert (await states(relay.admin_url))[removed.address] == "draining"
                assert await metric(relay, "relay_upstream_endpoints", state="draining") == 1
                before = removed.hits
                assert await get_many(relay.url, 10) == [200] * 10
                assert removed.hits == before  # new requests avoid it
                release.set()
                assert await asyncio.gather(*streams) == [(200, b"abcdef")] * 6
            # Its last stream closed: it leaves the set, its pool closed.
            await eventually(lambda: removed.address not in addresses(relay))
            assert await metric(relay, "relay_upstream_endpoints", state="draining") == 0
            await eventually(lambda: removed.server.open_connections == 0)


def draining(relay: RunningRelay) -> set[str]:
    balancer = relay.relay.upstreams()["up"].balancer
    assert balancer is not None
    return {e.address for e in balancer.endpoints if e.draining}


def addresses(relay: RunningRelay) -> set[str]:
    balancer = relay.relay.upstreams()["up"].balancer
    assert balancer is not None
    return set(balancer.endpoints.by_address)


async def test_failed_resolutions_keep_the_last_set(
    dns_server: DnsServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "relay.upstreams")
    async with pods({"/ok": respond(200, b"ok")}, ("127.0.0.2", "127.0.0.3")) as (one, two):
        dns_server.records[NAME] = [one.host, two.host]
        async with run_relay(discovered(dns_server, one.port)) as relay:
            dns_server.failing = True
            failures = "relay_upstream_discovery_refreshes_total"
            for _ in range(250):
                if await metric(relay, failures, result="failure") >= 3:
                    break
                await asyncio.sleep(0.02)
            assert await metric(relay, failures, result="failure") >= 3
            assert set(await states(relay.admin_url)) == {one.address, two.address}
            assert await get_many(relay.url, 20) == [200] * 20
            assert one.hits and two.hits
            # A name that no longer exists is a failure too: the set stays.
            dns_server.failing = False
            del dns_server.records[NAME]
            queries = dns_server.queries
            await eventually(lambda: dns_server.queries > queries + 4)
            assert set(await states(relay.admin_url)) == {one.address, two.address}
            dns_server.records[NAME] = [one.host]
            await eventually(lambda: addresses(relay) == {one.address})
    messages = [r.getMessage() for r in caplog.records if r.name == "relay.upstreams"]
    assert sum("resolving" in m and "failed" in m for m in messages) == 1, messages
    assert sum("works again" in m for m in messages) == 1


async def test_no_address_at_start_answers_503_until_one_resolves(dns_server: DnsServer) -> None:
    async with (
        pods({"/ok": respond(200, b"ok")}, ("127.0.0.2",)) as (pod,),
        run_relay(discovered(dns_server, pod.port)) as relay,
        http_client() as client,
    ):
        response = await client.get(f"{relay.url}/ok")
        assert response.status_code == 503
        assert "error=destination_unavailable" in response.headers["proxy-status"]
        dns_server.records[NAME] = [pod.host]
        for _ in range(250):
            response = await client.get(f"{relay.url}/ok")
            if response.status_code != 503:
                break
            await asyncio.sleep(0.02)
        assert response.status_code == 200 and pod.hits == 1


async def test_an_address_in_the_url_is_its_own_record(dns_server: DnsServer) -> None:
    async with pods({"/ok": respond(200, b"ok")}, ("127.0.0.2",)) as (pod,):
        config = discovered(dns_server, pod.port)
        config["upstreams"]["up"]["url"] = f"http://{pod.address}"
        async with run_relay(config) as relay:
            assert await get_many(relay.url, 3) == [200] * 3
        assert pod.hits == 3 and dns_server.queries == 0
