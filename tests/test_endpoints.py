"""Upstreams that are many endpoints: the config, the balancer over three servers on
127.0.0.2/.3/.4 (spread, least-request, the connect retry on another endpoint), passive
ejection and return, no healthy endpoint, and what the admin port, metrics and access log
say about them."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from opentelemetry.trace import SpanKind

from service.config import ConfigError, load_settings
from service.config_endpoints import OutlierConfig
from service.telemetry.tracing import Instrumentation
from service.upstreams.aiohttp_pool import AiohttpTransport
from service.upstreams.balance import BalancingTransport
from service.upstreams.endpoints import Endpoint, EndpointSet, NullEndpointObserver
from service.upstreams.httpcore_compat import url_at
from service.upstreams.outlier import OutlierDetector
from tests.support.endpoints import (
    Pod,
    balanced_upstream,
    get_many,
    pods,
    states,
    upstreams_view,
)
from tests.support.http import http_client
from tests.support.metrics import exposition_async, metric
from tests.support.net import eventually
from tests.support.relays import pool_settled, run_relay
from tests.support.scripted import delayed, echo, hang, respond
from tests.support.tls import TlsUpstream, server_context
from tests.support.tracing import in_memory
from tests.support.wire import raw_request

pytestmark = pytest.mark.usefixtures("no_error_logs")

HANDLERS = {"/ok": respond(200, b"ok"), "/base/ok": respond(200, b"ok"), "/echo": echo}
# Every request on a connection of its own: a stopped pod refuses the next one at once.
NO_KEEPALIVE = {"max_connections": 20, "max_keepalive_connections": 0}


async def scrape_text(relay: Any) -> str:
    return await exposition_async(relay.admin_url)


def endpoints_of(running: list[Pod]) -> list[str]:
    return [f"http://{pod.address}" for pod in running]


# -- config ------------------------------------------------------------------------------
VALID = """
upstreams:
  api: {url: "http://api.example:8080/base"%s}
routes:
  - {prefix: /, upstream: api}
"""


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        (', endpoints: ["https://10.0.0.7:8080"]', "upstreams.api: endpoints.0: https://"),
        (', endpoints: ["http://10.0.0.7:8080/x"]', "upstreams.api: endpoints.0: http://"),
        (', endpoints: ["http://10.0.0.7:1", "http://10.0.0.7:1"]', "endpoints.1: 10.0.0.7:1"),
        (', endpoints: ["10.0.0.7:1"]', "upstreams.api.endpoints.0"),
        (', endpoints: ["http://10.0.0.7:1"], discovery: {mode: dns}', "upstreams.api: endpoints"),
        (", discovery: {mode: srv}", "upstreams.api.discovery.mode"),
        (", discovery: {refresh_seconds: 0}", "upstreams.api.discovery.refresh_seconds"),
        (", discovery: {nameservers: [dns.local]}", "upstreams.api.discovery.nameservers.0"),
        (', discovery: {nameservers: ["10.0.0.1:0"]}', "upstreams.api.discovery.nameservers"),
        (", balance: random", "upstreams.api.balance"),
        (", pool: {max_connection_age_seconds: 0}", "pool.max_connection_age_seconds"),
        (", pool: {max_requests_per_connection: 0}", "pool.max_requests_per_connection"),
        (
            ", transport: httpcore, pool: {max_connection_age_seconds: 5}",
            "pool.max_connection_age_seconds: needs transport: aiohttp",
        ),
        (", outlier: {consecutive_failures: 0}", "upstreams.api.outlier.consecutive_failures"),
        (", outlier: {max_ejection_percent: 101}", "upstreams.api.outlier.max_ejection_percent"),
        (
            ", outlier: {base_ejection_seconds: 60, max_ejection_seconds: 10}",
            "upstreams.api.outlier: max_ejection_seconds (10) must not be below",
        ),
        (", health_check: {path: healthz}", "upstreams.api.health_check.path"),
        (", health_check: {path: /h, interval_seconds: 0}", "health_check.interval_seconds"),
        (", health_check: {healthy_threshold: 0}", "upstreams.api.health_check.healthy_threshold"),
        (", health_check: {pathh: /h}", "did you mean path?"),
    ],
)
def test_endpoint_config_errors_are_one_line_naming_the_field(
    tmp_path: Path, fields: str, named: str
) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(VALID % fields)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert named in message and "\n" not in message, message


def test_endpoint_config_defaults(tmp_path: Path) -> None:
    path = tmp_path / "relay.yaml"
    path.write_text(VALID % "")
    api = load_settings(path).upstreams["api"]
    assert api.endpoints == [] and not api.balanced
    assert (api.discovery.mode, api.discovery.refresh_seconds, api.balance) == (
        "none",
        5.0,
        "least_request",
    )
    assert (api.pool.max_connection_age_seconds, api.pool.max_requests_per_connection) == (
        None,
        None,
    )
    outlier = api.outlier
    assert (
        outlier.consecutive_failures,
        outlier.base_ejection_seconds,
        outlier.max_ejection_percent,
    ) == (5, 30.0, 50)
    check = api.health_check
    assert (check.path, check.interval_seconds, check.timeout_seconds) == (None, 5.0, 1.0)
    assert (check.unhealthy_threshold, check.healthy_threshold) == (3, 2)
    path.write_text(VALID % ', endpoints: ["http://10.0.0.7:8080", "http://[fd00::7]:8080"]')
    assert load_settings(path).upstreams["api"].balanced


# -- one endpoint: today's path --------------------------------------------------------
async def test_one_url_without_discovery_keeps_the_single_pool() -> None:
    async with (
        pods(HANDLERS, ("127.0.0.2",)) as (pod,),
        run_relay(balanced_upstream(f"http://{pod.address}")) as relay,
    ):
        up = relay.relay.upstreams()["up"]
        assert up.balancer is None
        assert type(up.transport.inner) is AiohttpTransport
        assert await get_many(relay.url, 3) == [200] * 3
        view = await upstreams_view(relay.admin_url)
        (endpoint,) = view["up"]["endpoints"]
        assert (endpoint["address"], endpoint["state"]) == (pod.address, "healthy")
        # No endpoint series for it: its one endpoint is always there.
        assert "relay_upstream_endpoints{" not in await scrape_text(relay)


# -- spreading -------------------------------------------------------------------------
@pytest.mark.parametrize("balance", ["least_request", "round_robin"])
async def test_requests_spread_over_every_endpoint(transport: str, balance: str) -> None:
    async with pods(HANDLERS) as running:
        config = balanced_upstream(
            "http://api.example:8080/base",
            transport=transport,
            balance=balance,
            endpoints=endpoints_of(running),
        )
        async with run_relay(config) as relay:
            assert isinstance(relay.relay.upstreams()["up"].transport.inner, BalancingTransport)
            assert await get_many(relay.url, 30, path="/ok", concurrency=3) == [200] * 30
            await eventually(lambda: pool_settled(relay))
            # The admin view per endpoint and the pool gauges per upstream agree.
            view = (await upstreams_view(relay.admin_url))["up"]
            assert {e["address"] for e in view["endpoints"]} == {p.address for p in running}
            idle = sum(e["pool"]["idle"] for e in view["endpoints"])
            assert idle == await metric(relay, "relay_pool_connections", state="idle") > 0
            assert await metric(relay, "relay_pool_connections", state="in_use") == 0
        hits = [pod.hits for pod in running]
        assert sum(hits) == 30
        if balance == "round_robin":
            assert hits == [10, 10, 10], hits
        else:
            assert min(hits) >= 3, hits
        for pod in running:
            seen = pod.server.seen[0]
            # Only the address changes: Host and the base path are url's.
            assert (seen.headers["host"], seen.path) == ("api.example:8080", "/base/ok")


async def test_least_request_sends_fewer_to_a_slow_endpoint() -> None:
    async with pods(HANDLERS) as running:
        running[0].server.handlers["/ok"] = delayed(0.1, respond(200, b"slow"))
        config = balanced_upstream("http://api.example:8080", endpoints=endpoints_of(running))
        async with run_relay(config) as relay:
            assert await get_many(relay.url, 90, concurrency=6) == [200] * 90
        slow, *fast = (pod.hits for pod in running)
        # Round robin would give it 30; with two choices it gets a request only when both
        # draws are busy at least as much.
        assert slow < min(fast) / 2, (slow, fast)


# -- connect failures, ejection and return ---------------------------------------------
async def test_a_connect_failure_is_tried_on_another_endpoint_for_any_method(
    transport: str,
) -> None:
    async with pods(HANDLERS, HOSTS_2) as running:
        down = running[1]
        await down.stop()
        config = balanced_upstream(
            "http://api.example:8080",
            transport=transport,
            endpoints=endpoints_of(running),
            pool=NO_KEEPALIVE,
            # Never ejected here: every request may meet the stopped one first.
            outlier={"consecutive_failures": 1000},
        )
        async with run_relay(config) as relay, http_client(timeout=5) as client:
            for index in range(8):
                response = await client.post(f"{relay.url}/echo", content=f"body {index}")
                assert (response.status_code, response.text) == (200, f"body {index}")
        assert running[0].hits == 8


HOSTS_2 = ("127.0.0.2", "127.0.0.3")


async def test_a_stopped_endpoint_is_ejected_then_returns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "relay.upstreams")
    async with pods(HANDLERS) as running:
        down = running[1]
        config = balanced_upstream(
            "http://api.example:8080",
            endpoints=endpoints_of(running),
            pool=NO_KEEPALIVE,
            # Long enough to outlast the checks below on a loaded machine.
            outlier={"consecutive_failures": 2, "base_ejection_seconds": 2},
        )
        async with run_relay(config) as relay:
            await down.stop()
            # Idempotent or not, no request fails: each connect failure goes to another.
            assert await get_many(relay.url, 30) == [200] * 30
            assert (await states(relay.admin_url))[down.address] == "ejected"
            assert (
                await metric(
                    relay, "relay_upstream_ejections_total", upstream="up", reason="connect"
                )
                == 1
            )
            assert await metric(relay, "relay_upstream_endpoints", state="ejected") == 1
            view = await upstreams_view(relay.admin_url)
            (entry,) = [e for e in view["up"]["endpoints"] if e["address"] == down.address]
            assert entry["consecutive_failures"] == 2 and entry["ejected_until"] is not None
            before = down.hits
            await down.start()
            await eventually(lambda: down.address not in ejected_addresses(relay), within=10)
            assert await get_many(relay.url, 30) == [200] * 30
            assert down.hits > before
        assert any("ejected for 2s" in r.getMessage() for r in caplog.records)


def ejected_addresses(relay: Any) -> set[str]:
    balancer = relay.relay.upstreams()["up"].balancer
    return {e.address for e in balancer.endpoints if e.ejected}


async def test_never_more_than_the_share_of_endpoints_is_ejected() -> None:
    async with pods(HANDLERS) as running:
        config = balanced_upstream(
            "http://api.example:8080",
            endpoints=endpoints_of(running),
            pool=NO_KEEPALIVE,
            outlier={"consecutive_failures": 1, "max_ejection_percent": 34},
        )
        async with run_relay(config) as relay:
            for pod in running[1:]:
                await pod.stop()
            statuses = await get_many(relay.url, 20)
            # 34% of three: one ejected; the other stopped one keeps being tried (a request
            # that meets both stopped ones fails: the connect retry is one).
            assert len(ejected_addresses(relay)) == 1
            assert statuses.count(200) >= 10 and set(statuses) <= {200, 502}


async def test_ejection_doubles_up_to_its_cap() -> None:
    """The outlier detector on its own, over real endpoint records (no traffic)."""

    def endpoint(host: str, port: int) -> Endpoint:
        pool = AiohttpTransport(limits=httpx.Limits(), tls=httpx.create_ssl_context())
        return Endpoint("http", host, port, pool, pool)

    endpoints = EndpointSet("up", endpoint)
    endpoints.replace([("10.0.0.1", 80), ("10.0.0.2", 80), ("10.0.0.3", 80)])
    config = OutlierConfig(
        consecutive_failures=2, base_ejection_seconds=10, max_ejection_seconds=25
    )
    ejected: list[str] = []

    class Observer(NullEndpointObserver):
        def ejection(self, upstream: str, reason: str) -> None:
            ejected.append(reason)

    detector = OutlierDetector(config, endpoints, Observer())
    first = endpoints.by_address["10.0.0.1:80"]
    lengths = []
    for _ in range(3):
        detector.failure(first, "reset")
        assert not first.ejected  # one failure: below the threshold
        detector.failure(first, "status")
        assert first.ejected and first not in endpoints.eligible
        assert first.ejected_until is not None
        lengths.append(round(first.ejected_until - time.time()))
        assert first.return_timer is not None
        first.return_timer._run()  # the timer's own callback: back from ejection
        assert not first.ejected and first in endpoints.eligible
    assert lengths == [10, 20, 25]
    assert ejected == ["status"] * 3
    detector.success(first)
    assert first.consecutive_failures == 0 and first.ejections == 3  # not forgiven yet
    await endpoints.aclose()


async def test_no_healthy_endpoint_answers_503_at_once() -> None:
    async with pods(HANDLERS, HOSTS_2) as running:
        config = balanced_upstream(
            "http://api.example:8080",
            endpoints=endpoints_of(running),
            pool=NO_KEEPALIVE,
            outlier={"consecutive_failures": 1, "max_ejection_percent": 100},
        )
        async with run_relay(config) as relay, http_client(timeout=5) as client:
            for pod in running:
                await pod.stop()
            # Fails on one endpoint, then on the other: both ejected.
            assert (await client.get(f"{relay.url}/ok")).status_code == 502
            response = await client.get(f"{relay.url}/ok")
            assert response.status_code == 503
            assert "error=destination_unavailable" in response.headers["proxy-status"]
            assert response.headers["retry-after"] == "1"
            assert b"no healthy upstream endpoint" in response.content
            assert (
                await metric(
                    relay,
                    "relay_upstream_errors_total",
                    upstream="up",
                    reason="no_healthy_endpoint",
                )
                == 1
            )
            assert await metric(relay, "relay_upstream_endpoints", state="ejected") == 2
            await eventually(lambda: pool_settled(relay))


async def test_access_log_names_the_endpoint(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "relay.access")
    async with pods(HANDLERS, HOSTS_2) as running:
        config = balanced_upstream(
            "http://api.example:8080", balance="round_robin", endpoints=endpoints_of(running)
        )
        async with run_relay(config) as relay:
            assert await get_many(relay.url, 4) == [200] * 4
    logged = [getattr(r, "upstream_addr", None) for r in caplog.records if r.name == "relay.access"]
    assert sorted(logged) == sorted([pod.address for pod in running] * 2)


async def test_clients_hanging_up_leave_every_endpoint_pool_idle(transport: str) -> None:
    """Disconnect safety across endpoints: clients hanging up mid-body leave every
    endpoint's pool, and the upstream's, with nothing in use."""

    async def slow_body(request: Any, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"x" * 1000)
        await writer.drain()
        await asyncio.sleep(5)

    async with pods({**HANDLERS, "/slow": slow_body, "/hang": hang}) as running:
        config = balanced_upstream(
            "http://api.example:8080", transport=transport, endpoints=endpoints_of(running)
        )
        async with run_relay(config) as relay:
            up = relay.relay.upstreams()["up"]
            balancer = up.balancer
            assert balancer is not None

            async def hang_up() -> None:
                async with (
                    http_client(timeout=5) as client,
                    client.stream("GET", f"{relay.url}/slow") as response,
                ):
                    await response.aiter_raw().__anext__()

            await asyncio.gather(*(hang_up() for _ in range(9)))
            # And before the response headers: the upstream never answers.

            def all_arrived() -> bool:
                return sum(r.path == "/hang" for p in running for r in p.server.seen) >= 6

            waiting = [
                asyncio.create_task(raw_request(relay.url, "/hang", hang_up_when=all_arrived))
                for _ in range(6)
            ]
            await asyncio.gather(*waiting)
            await eventually(lambda: pool_settled(relay))
            await eventually(lambda: all(e.in_flight == 0 for e in balancer.endpoints))
            assert up.snapshot().in_use == 0


@pytest.mark.parametrize("mode", ["stock", "native"])
async def test_client_spans_name_the_endpoint_of_each_attempt(mode: Instrumentation) -> None:
    tracing, exporter = in_memory(mode)
    async with pods(HANDLERS, HOSTS_2) as running:
        down, up = running
        await down.stop()
        config = balanced_upstream(
            "http://api.example:8080",
            balance="round_robin",
            endpoints=endpoints_of(running),
            pool=NO_KEEPALIVE,
        )
        async with run_relay(config, tracing=tracing) as relay:
            # Round robin starts on the second endpoint: the first request goes to the
            # stopped one on the second turn.
            assert await get_many(relay.url, 2) == [200, 200]
            await eventually(lambda: len(by_kind(exporter.get_finished_spans())) == 3)
    attempts = [
        (span.attributes["server.address"], span.attributes["server.port"])
        for span in by_kind(exporter.get_finished_spans())
        if span.attributes is not None
    ]
    assert sorted(attempts) == sorted(
        [(up.host, up.port), (down.host, down.port), (up.host, up.port)]
    )


def by_kind(spans: Any) -> list[Any]:
    return [span for span in spans if span.kind is SpanKind.CLIENT]


async def test_tls_to_an_endpoint_address_names_the_url_host(
    transport: str, tmp_path: Path
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    server = TlsUpstream(server_context(ca.issue_cert("api.relay.test")))
    async with server.running():
        config = balanced_upstream(
            f"https://api.relay.test:{server.port}",
            transport=transport,
            endpoints=[f"https://127.0.0.1:{server.port}"],
            tls={"ca_file": str(ca_file)},
        )
        async with run_relay(config) as relay, http_client(timeout=5) as client:
            response = await client.get(f"{relay.url}/x")
            assert response.status_code == 200, response.text
    # Connected to the address; SNI and the certificate's name are url's host.
    assert server.sni == ["api.relay.test"]


@pytest.mark.parametrize(
    ("host", "port", "expected"),
    [
        ("10.0.0.7", 8080, "http://10.0.0.7:8080/base/a%20b?q=1&r=%2F"),
        ("fd00::7", 8081, "http://[fd00::7]:8081/base/a%20b?q=1&r=%2F"),
    ],
)
def test_url_at_changes_only_host_and_port(host: str, port: int, expected: str) -> None:
    url = httpx.URL("http://api.example:8080/base/a%20b?q=1&r=%2F")
    moved = url_at(url, host, port)
    assert moved == httpx.URL(expected)
    assert (moved.raw_path, moved.host, moved.port) == (url.raw_path, host, port)


ENDPOINT_EXPOSITION = """
import sys
if sys.argv[1] == "multi":
    from service.telemetry.multiproc import use_files_of
    use_files_of("w0")
from service.telemetry.metrics import Metrics
from service.upstreams.endpoints import EndpointCounts
counts = [("a", EndpointCounts(healthy=2, ejected=1)), ("b", EndpointCounts(draining=1))]
metrics = Metrics(endpoint_counts=lambda: counts)
metrics.sample_pools()  # the multiprocess sampler; nothing in one process
body, _ = metrics.render(None)
sys.stdout.write(body.decode())
"""


@pytest.mark.live
def test_endpoint_gauge_is_the_same_with_one_process_and_with_several(tmp_path: Path) -> None:
    def lines(mode: str, directory: str) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", ENDPOINT_EXPOSITION, mode],
            env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": directory},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return [line for line in result.stdout.splitlines() if "relay_upstream_endpoints" in line]

    single = lines("single", "")
    several = lines("multi", str(tmp_path))
    assert 'relay_upstream_endpoints{state="ejected",upstream="a"} 1.0' in single
    assert len(single) == 2 + 8  # HELP, TYPE, four states of two upstreams
    assert sorted(several) == sorted(single)
