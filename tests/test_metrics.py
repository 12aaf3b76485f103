"""Metrics against ground truth: a scripted mix through the real proxy, counted exactly."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from prometheus_client.exposition import choose_encoder

from service.exchange import Exchange
from service.telemetry.metrics import Metrics
from service.telemetry.prometheus_compat import legacy_names_as_is
from tests.support.http import http_client
from tests.support.metrics import exposition_async, scrape_async, value
from tests.support.net import closed_port, eventually
from tests.support.relays import RunningRelay, run_relay
from tests.support.scripted import (
    ScriptedUpstream,
    delayed,
    echo,
    endless_stream,
    hang,
    reset_mid_body,
    respond,
)
from tests.support.tools import require_tool
from tests.support.wire import raw_request

N_OK, N_MISSING, N_SLOW, N_CONNECT, N_HANG, N_STREAM, N_RESET, N_ECHO = 7, 5, 2, 3, 2, 3, 2, 4
ECHO_SIZE = 1000


@pytest.fixture
async def mix() -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    upstream = ScriptedUpstream(
        {
            "/ok": respond(200, b"ok"),
            "/missing": respond(404, b"nope"),
            "/slow": delayed(2.0, respond(200, b"late")),
            "/hang": hang,
            "/stream": endless_stream,
            "/reset": reset_mid_body,
        }
    )
    exact = ScriptedUpstream({"/echo": echo, "/ok": respond(200, b"ok")})
    async with upstream.running(), exact.running():
        config: dict[str, Any] = {
            "upstreams": {
                "a": {"url": upstream.url, "timeouts": {"read": 0.3}},
                "dead": {"url": f"http://127.0.0.1:{closed_port()}"},
                "exact": {"url": exact.url},
            },
            "routes": [
                {"prefix": "/dead", "upstream": "dead", "strip_prefix": True},
                {"prefix": "/exact", "upstream": "exact", "strip_prefix": True},
                {"prefix": "/", "upstream": "a"},
            ],
        }
        async with run_relay(config) as running:
            yield running, upstream


async def drive_mix(running: RunningRelay, upstream: ScriptedUpstream) -> None:
    async with http_client(base_url=running.url, timeout=10) as client:
        for _ in range(N_OK):
            assert (await client.get("/ok")).status_code == 200
        for _ in range(N_MISSING):
            assert (await client.get("/missing")).status_code == 404
        for _ in range(N_SLOW):
            assert (await client.get("/slow")).status_code == 504
        for _ in range(N_CONNECT):
            assert (await client.get("/dead/x")).status_code == 502
        for _ in range(N_ECHO):
            response = await client.post("/exact/echo", content=b"e" * ECHO_SIZE)
            assert response.content == b"e" * ECHO_SIZE
        for _ in range(N_RESET):
            with pytest.raises(httpx.HTTPError):
                await client.get("/reset")
    for _ in range(N_HANG):
        seen = len(upstream.seen)
        await raw_request(
            running.url, "/hang", hang_up_when=lambda seen=seen: len(upstream.seen) > seen
        )
    for _ in range(N_STREAM):
        await raw_request(running.url, "/stream", read_bytes=2000)


async def test_counters_match_ground_truth(mix: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = mix
    await drive_mix(running, upstream)
    total_a = N_OK + N_MISSING + N_SLOW + N_HANG + N_STREAM + N_RESET

    def settled() -> bool:
        return all(s.in_use == 0 and s.waiting == 0 for s in running.relay.upstreams().snapshots())

    await eventually(settled)

    for _ in range(100):  # bounded: each exchange is counted as its handler ends
        m = await scrape_async(running.admin_url)
        if value(m, "relay_requests_total", upstream="a") == total_a:
            break
        await asyncio.sleep(0.05)

    assert value(m, "relay_requests_total", upstream="a", code="200") == N_OK + N_STREAM + N_RESET
    assert value(m, "relay_requests_total", upstream="a", code="404") == N_MISSING
    assert value(m, "relay_requests_total", upstream="a", code="504") == N_SLOW
    assert value(m, "relay_requests_total", upstream="a", code="499") == N_HANG
    assert value(m, "relay_requests_total", upstream="dead", code="502") == N_CONNECT
    assert value(m, "relay_requests_total", upstream="exact") == N_ECHO
    assert value(m, "relay_requests_total", method="GET") == total_a + N_CONNECT

    assert value(m, "relay_upstream_errors_total", upstream="a", reason="read_timeout") == N_SLOW
    assert value(m, "relay_upstream_errors_total", upstream="a", reason="reset") == N_RESET
    assert value(m, "relay_upstream_errors_total", upstream="dead", reason="connect") == N_CONNECT
    assert value(m, "relay_upstream_errors_total") == N_SLOW + N_RESET + N_CONNECT

    disc = "relay_disconnects_total"
    assert value(m, disc, upstream="a", side="client", phase="before_headers") == N_HANG
    assert value(m, disc, upstream="a", side="client", phase="body") == N_STREAM
    assert value(m, disc, upstream="a", side="upstream", phase="body") == N_RESET
    assert value(m, disc) == N_HANG + N_STREAM + N_RESET

    hist = "relay_request_duration_seconds_count"
    assert value(m, hist, upstream="a") == total_a
    assert value(m, hist, upstream="dead") == N_CONNECT
    headers = "relay_upstream_response_headers_seconds_count"
    assert value(m, headers, upstream="a") == N_OK + N_MISSING + N_STREAM + N_RESET
    assert value(m, "relay_pool_wait_seconds_count", upstream="exact") == N_ECHO

    assert value(m, "relay_request_body_bytes_total", upstream="exact") == N_ECHO * ECHO_SIZE
    assert value(m, "relay_response_body_bytes_total", upstream="exact") == N_ECHO * ECHO_SIZE

    assert value(m, "relay_pool_connections", upstream="a", state="in_use") == 0
    assert value(m, "relay_pool_waiting_requests", upstream="a") == 0
    assert value(m, "relay_pool_max_connections", upstream="a") == 100
    assert value(m, "relay_requests_in_flight") == 0
    assert value(m, "relay_pool_timeouts_total") == 0
    assert value(m, "relay_build_info") == 1


async def test_pool_timeout_and_saturation_counted() -> None:
    upstream = ScriptedUpstream({"/slow": delayed(1.0, respond(200, b"ok"))})
    async with upstream.running():
        config = {
            "upstreams": {
                "a": {
                    "url": upstream.url,
                    "pool": {"max_connections": 1, "max_keepalive_connections": 1},
                    "timeouts": {"pool": 0.2},
                }
            },
            "routes": [{"prefix": "/", "upstream": "a"}],
        }
        async with run_relay(config) as running, http_client(timeout=5) as client:
            first = asyncio.create_task(client.get(f"{running.url}/slow"))
            await eventually(lambda: running.relay.upstreams()["a"].snapshot().in_use == 1)
            m = await scrape_async(running.admin_url)
            assert value(m, "relay_pool_connections", upstream="a", state="in_use") == 1
            second = asyncio.create_task(client.get(f"{running.url}/slow"))
            await eventually(lambda: running.relay.upstreams()["a"].snapshot().waiting == 1)
            m = await scrape_async(running.admin_url)
            assert value(m, "relay_pool_waiting_requests", upstream="a") == 1
            assert (await second).status_code == 503
            assert (await first).status_code == 200
            m = await scrape_async(running.admin_url)
            assert value(m, "relay_pool_timeouts_total", upstream="a") == 1
            assert value(m, "relay_upstream_errors_total", upstream="a", reason="pool_timeout") == 1
            assert value(m, "relay_requests_total", upstream="a", code="503") == 1
            assert value(m, "relay_pool_wait_seconds_bucket", upstream="a", le="0.1") == 1
            assert value(m, "relay_pool_connections", upstream="a", state="idle") == 1


async def test_unknown_methods_are_folded(mix: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, _ = mix
    async with http_client(base_url=running.url) as client:
        await client.request("PROPFIND", "/ok")
        await client.request("PURGE", "/ok")
    m = await scrape_async(running.admin_url)
    assert value(m, "relay_requests_total", method="other") == 2
    assert not any("PROPFIND" in str(labels) for (_, labels) in m)


async def test_openmetrics_when_asked(mix: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, _ = mix
    async with http_client() as client:
        plain = await client.get(f"{running.admin_url}/metrics")
        om = await client.get(
            f"{running.admin_url}/metrics", headers={"accept": "application/openmetrics-text"}
        )
        slash = await client.get(f"{running.admin_url}/metrics/")
    assert plain.headers["content-type"].startswith("text/plain")
    assert om.headers["content-type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")
    assert slash.status_code == 404  # exact route, no redirect


@pytest.mark.live
async def test_promtool_accepts_exposition(mix: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = mix
    await drive_mix(running, upstream)
    promtool = require_tool("promtool")
    text = await exposition_async(running.admin_url)
    process = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(text.encode()), 30)
    assert process.returncode == 0, output.decode()
    # promtool prints some lint problems without failing: demand none.
    assert output.decode().strip() == "", output.decode()


async def test_counters_start_at_zero_for_every_configured_upstream_and_route() -> None:
    """Before any traffic, every series of a closed label set exists at 0, so that rate()
    counts the first failure of each kind; the open-ended families appear on first use."""
    from service.errors import CLIENT_REASONS, Reason

    config = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}, "web": {"url": "http://127.0.0.1:9"}},
        "routes": [
            {"name": "api-v1", "prefix": "/v1", "upstream": "api"},
            {"prefix": "/", "upstream": "web"},
        ],
    }
    async with run_relay(config) as relay:
        got = await scrape_async(relay.admin_url)

    def series(name: str, **labels: str) -> float | None:
        return got.get((name, frozenset(labels.items())))

    for upstream in ("api", "web"):
        for reason in Reason:
            value = series("relay_upstream_errors_total", upstream=upstream, reason=reason.value)
            assert value == (None if reason in CLIENT_REASONS else 0.0), reason
        for side in ("client", "upstream"):
            for phase in ("before_headers", "body"):
                assert (
                    series("relay_disconnects_total", upstream=upstream, side=side, phase=phase)
                    == 0
                )
        retries = "relay_upstream_retries_total"
        # The pool gate's own retries (the keep-alive race, a refused connect); no route of
        # these retries under a policy: no other reason, no budget.
        assert {key for key in got if key[0] == retries and ("upstream", upstream) in key[1]} == {
            (retries, frozenset({("upstream", upstream), ("reason", reason)}))
            for reason in ("stale_connection", "connect")
        }
        assert series(retries, upstream=upstream, reason="stale_connection") == 0
        assert series(retries, upstream=upstream, reason="connect") == 0
        assert series("relay_upstream_retry_budget_exhausted_total", upstream=upstream) is None
        for name in (
            "relay_pool_timeouts_total",
            "relay_request_body_bytes_total",
            "relay_response_body_bytes_total",
        ):
            assert series(name, upstream=upstream) == 0, name
        assert series("relay_requests_in_flight", upstream=upstream) == 0
    for upstream, route in (("api", "api-v1"), ("web", "web")):
        assert series("relay_requests_failed_total", upstream=upstream, route=route) == 0
        assert series("relay_responses_truncated_total", upstream=upstream, route=route) == 0
    assert not [key for key in got if key[0] == "relay_requests_total"]


POOL_EXPOSITION = """
import sys
from service.upstreams.gated import PoolSnapshot
if sys.argv[1] == "multi":
    from service.telemetry.multiproc import use_files_of
    use_files_of("w0")
from service.telemetry.metrics import Metrics
snaps = [PoolSnapshot("a", 3, 2, 10, 1), PoolSnapshot("b", 0, 5, 7, 0)]
metrics = Metrics(lambda: snaps)
metrics.sample_pools()  # the multiprocess sampler; nothing in one process
body, _ = metrics.render(None)
sys.stdout.write(body.decode())
"""


@pytest.mark.live
def test_pool_gauges_are_the_same_with_one_process_and_with_several(tmp_path: Any) -> None:
    """One definition of the pool gauges: read at scrape time in one process, sampled into
    live gauges with several; the scrape answers the same either way."""

    def pool_lines(mode: str, env: dict[str, str]) -> list[str]:
        result = subprocess.run(
            [sys.executable, "-c", POOL_EXPOSITION, mode],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        gauges = ("relay_pool_connections", "relay_pool_max_", "relay_pool_waiting_")
        return [line for line in result.stdout.splitlines() if any(g in line for g in gauges)]

    single = pool_lines("single", {"PROMETHEUS_MULTIPROC_DIR": ""})
    several = pool_lines("multi", {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert 'relay_pool_connections{state="in_use",upstream="a"} 3.0' in single
    assert 'relay_pool_waiting_requests{upstream="a"} 1.0' in single
    assert len(single) == 6 + 8  # HELP and TYPE of three families, eight samples
    assert sorted(several) == sorted(single)


ZERO_EXPOSITION = """
import sys
if sys.argv[1] == "multi":
    from service.telemetry.multiproc import use_files_of
    use_files_of("w0")
from service.errors import Reason
from service.exchange import Exchange
from service.telemetry.metrics import Metrics
metrics = Metrics()
metrics.start_at_zero(["api", "web"], [("api", "api-v1"), ("web", "web")])
if sys.argv[2] == "touched":
    exchange = Exchange("GET", "api-v1", "api")
    exchange.fail(Reason.CONNECT)
    metrics.started(exchange)
    metrics.finished(exchange)
body, _ = metrics.render(None)
sys.stdout.write(body.decode())
"""


@pytest.mark.live
@pytest.mark.parametrize("traffic", ["untouched", "touched"])
def test_zero_series_are_the_same_with_one_process_and_with_several(
    tmp_path: Any, traffic: str
) -> None:
    """The preset series are filled in at scrape time: the multiprocess merge yields only
    families a worker wrote to, so a family nobody touched yet must still be exposed, and a
    touched one must keep its other series at 0."""

    def series(mode: str, env: dict[str, str]) -> dict[str, str]:
        result = subprocess.run(
            [sys.executable, "-c", ZERO_EXPOSITION, mode, traffic],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        lines = [line for line in result.stdout.splitlines() if line.startswith("relay_")]
        keep = ("_total{", "relay_requests_in_flight{")
        return dict(line.rsplit(" ", 1) for line in lines if any(k in line for k in keep))

    one = series("one", {"PROMETHEUS_MULTIPROC_DIR": ""})
    several = series("multi", {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert one == several
    errors = 'relay_upstream_errors_total{reason="connect",upstream="api"}'
    assert one[errors] == ("1.0" if traffic == "touched" else "0.0")
    assert one['relay_upstream_errors_total{reason="connect",upstream="web"}'] == "0.0"
    for name in ("relay_requests_failed_total", "relay_responses_truncated_total"):
        assert one[f'{name}{{route="web",upstream="web"}}'] == "0.0"
    assert one['relay_disconnects_total{phase="body",side="client",upstream="web"}'] == "0.0"
    assert one['relay_requests_in_flight{upstream="web"}'] == "0.0"


@pytest.mark.parametrize(
    "accept",
    [
        "application/openmetrics-text",
        "application/openmetrics-text; version=1.0.0",
        "text/plain; version=1.0.0",
        "",
    ],
)
def test_names_written_as_they_are_are_the_escaped_bytes(accept: str) -> None:
    """Every name Relay exposes is in the legacy set, so skipping the ``underscores`` escape
    (a character-by-character test in the OpenMetrics encoder) changes no byte."""
    metrics = Metrics()
    metrics.start_at_zero(["api"], [("api", "api-v1")])
    exchange = Exchange("GET", "api-v1", "api")
    metrics.started(exchange)
    exchange.status, exchange.headers_seconds, exchange.total_seconds = 200, 0.01, 0.02
    metrics.headers(exchange)
    metrics.finished(exchange)
    escaped, _ = choose_encoder(accept)
    as_is = legacy_names_as_is(escaped)
    if accept.startswith("application/openmetrics-text"):
        assert as_is is not escaped  # the encoder the scrape uses is not the one compared
    families = list(metrics.registry.collect())  # once: process figures change meanwhile
    frozen = SimpleNamespace(collect=lambda: families)
    assert as_is(frozen) == escaped(frozen)
