"""Tracing: span shape in memory, and the real OTLP wire with logs and exemplars agreeing.

Every span-shape check runs twice: with the stock FastAPI and httpx instrumentations (the
default) and with ``tracing.instrumentation: native``; only the instrumentation scope differs.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from service.telemetry.tracing import Instrumentation, exporter_from_env
from tests.support.http import http_client
from tests.support.net import closed_port, eventually, wait_until
from tests.support.otlp import ReceivedSpan, otlp_receiver
from tests.support.relays import RunningRelay, demo_config, one_upstream, run_relay, spawn_relay
from tests.support.scripted import ScriptedUpstream, endless_stream, respond, stale_after_first
from tests.support.tracing import in_memory
from tests.support.wire import raw_request

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")
MODES = ["stock", "native"]
# Instrumentation scope of (server span, client span) in each mode.
SCOPES = {
    "stock": ("opentelemetry.instrumentation.fastapi", "opentelemetry.instrumentation.httpx"),
    "native": ("relay", "relay"),
}


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest) -> Instrumentation:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def traced(
    mode: Instrumentation,
) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter]]:
    upstream = ScriptedUpstream(
        {"/ok": respond(200, b"ok"), "/stream": endless_stream, "/stale": stale_after_first()}
    )
    async with upstream.running():
        config = {
            "upstreams": {
                "api": {"url": upstream.url},
                "dead": {"url": f"http://127.0.0.1:{closed_port()}"},
            },
            "routes": [
                {"prefix": "/dead", "upstream": "dead"},
                {"name": "api-route", "prefix": "/", "upstream": "api"},
            ],
        }
        tracing, exporter = in_memory(mode)
        async with run_relay(config, tracing=tracing) as running:
            yield running, upstream, exporter


def by_kind(spans: tuple[ReadableSpan, ...], kind: SpanKind) -> list[ReadableSpan]:
    return [s for s in spans if s.kind is kind]


async def test_one_server_and_one_client_span(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter], mode: Instrumentation
) -> None:
    running, upstream, exporter = traced
    async with http_client() as client:
        assert (await client.get(f"{running.url}/ok?x=1")).status_code == 200
    await eventually(lambda: len(exporter.get_finished_spans()) == 2)
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client_span,) = by_kind(spans, SpanKind.CLIENT)
    assert server.name == "GET /"
    assert client_span.name == "GET"
    scopes = (server.instrumentation_scope, client_span.instrumentation_scope)
    assert tuple(scope.name for scope in scopes if scope is not None) == SCOPES[mode]
    assert server.attributes is not None and client_span.attributes is not None
    assert server.attributes["http.route"] == "/"
    assert server.attributes["relay.upstream"] == "api"
    assert server.attributes["relay.route"] == "api-route"
    status_keys = ("http.status_code", "http.response.status_code")
    assert any(server.attributes.get(k) == 200 for k in status_keys)
    assert client_span.attributes["relay.upstream"] == "api"
    assert any(client_span.attributes.get(k) == 200 for k in status_keys)
    assert client_span.parent is not None and server.context is not None
    assert client_span.parent.span_id == server.context.span_id
    assert client_span.context is not None
    assert client_span.context.trace_id == server.context.trace_id

    sent = upstream.seen[-1].headers["traceparent"]
    match = TRACEPARENT.match(sent)
    assert match, sent
    assert match.group(1) == format(server.context.trace_id, "032x")
    assert match.group(2) == format(client_span.context.span_id, "016x")


async def test_inbound_traceparent_is_continued_not_forwarded(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, upstream, exporter = traced
    inbound = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with http_client() as client:
        await client.get(f"{running.url}/ok", headers={"traceparent": inbound})
    await eventually(lambda: len(exporter.get_finished_spans()) == 2)
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    assert server.parent is not None
    assert format(server.parent.span_id, "016x") == "b7ad6b7169203331"
    sent = upstream.seen[-1].headers["traceparent"]
    assert sent != inbound
    assert sent.startswith("00-0af7651916cd43dd8448eb211c80319c-")


async def test_retry_shows_two_client_spans(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, _, exporter = traced
    async with http_client() as client:
        assert (await client.get(f"{running.url}/stale")).status_code == 200
        exporter.clear()
        assert (await client.get(f"{running.url}/stale")).status_code == 200
    await eventually(lambda: len(by_kind(exporter.get_finished_spans(), SpanKind.SERVER)) == 1)
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    attempts = by_kind(spans, SpanKind.CLIENT)
    assert len(attempts) == 2
    assert server.context is not None
    assert all(
        a.parent is not None and a.parent.span_id == server.context.span_id for a in attempts
    )
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR, StatusCode.UNSET]
    resends = [(a.attributes or {}).get("http.request.resend_count") for a in attempts]
    assert resends == [None, 1]


async def test_errors_recorded_with_reason(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, _, exporter = traced
    async with http_client() as client:
        assert (await client.get(f"{running.url}/dead/x")).status_code == 502
    await eventually(lambda: len(by_kind(exporter.get_finished_spans(), SpanKind.SERVER)) == 1)
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None
    assert server.attributes["relay.reason"] == "connect"
    assert [e.name for e in server.events] == ["proxy_error"]
    # A refused connect is tried once more: a client span per attempt, both failed.
    attempts = by_kind(spans, SpanKind.CLIENT)
    assert [a.status.status_code for a in attempts] == [StatusCode.ERROR] * 2
    resends = [(a.attributes or {}).get("http.request.resend_count") for a in attempts]
    assert sorted(resends, key=lambda r: r or 0) == [None, 1]


async def test_client_disconnect_is_an_event(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, _, exporter = traced
    await raw_request(running.url, "/stream", read_bytes=2000)
    await eventually(lambda: len(by_kind(exporter.get_finished_spans(), SpanKind.SERVER)) == 1)
    (server,) = by_kind(exporter.get_finished_spans(), SpanKind.SERVER)
    (event,) = server.events
    assert event.name == "client_disconnect"
    assert event.attributes is not None
    assert event.attributes["relay.disconnect.phase"] == "body"


async def test_admin_endpoints_are_not_traced(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, _, exporter = traced
    async with http_client() as client:
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await client.get(f"{running.admin_url}{path}")).status_code == 200
    assert exporter.get_finished_spans() == ()


@pytest.mark.parametrize(
    ("env", "enabled"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, True),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"}, True),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "console"}, True),
    ],
)
def test_enabled_only_by_otel_env(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], enabled: bool
) -> None:
    for name in (
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_SDK_DISABLED",
        "OTEL_TRACES_EXPORTER",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, val in env.items():
        monkeypatch.setenv(name, val)
    assert (exporter_from_env() is not None) is enabled


@pytest.mark.live
@pytest.mark.parametrize("instrumentation", MODES)
def test_otlp_wire_upstream_logs_and_exemplar_share_the_trace(
    tmp_path: Path, instrumentation: str
) -> None:
    with otlp_receiver() as (endpoint, receiver):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "OTEL_SERVICE_NAME": "relay-wire",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
        }
        config = demo_config()
        config["log"] = {"access_log": True, "format": "json"}
        config["tracing"] = {"instrumentation": instrumentation}
        with spawn_relay(config, tmp_path, env) as relay:
            seen_by_upstream = httpx.get(f"{relay.url}/headers").json()["headers"]
            match = TRACEPARENT.match(seen_by_upstream["traceparent"])
            assert match, seen_by_upstream
            trace_id, parent_id = match.group(1), match.group(2)
            metrics = httpx.get(
                f"{relay.admin_url}/metrics", headers={"accept": "application/openmetrics-text"}
            ).text
            for path in ("/healthz", "/readyz"):
                assert httpx.get(f"{relay.admin_url}{path}").status_code == 200
            # A client that hangs up mid-stream: the server span still ends, saying so.
            asyncio.run(raw_request(relay.url, "/stream/100", read_bytes=200))
            spans = receiver.wait_for(
                lambda s: (
                    len([x for x in s if x.trace_id == trace_id]) >= 2
                    and any("client_disconnect" in x.events for x in s)
                )
            )
            # Access lines are written in batches, at most 100 ms after the exchange.
            wait_until(lambda: '"relay.access"' in relay.log(), 5, "no access line")
            log_lines = [
                json.loads(line) for line in relay.log().splitlines() if line.startswith("{")
            ]
        mine = [s for s in spans if s.trace_id == trace_id]
        server = [s for s in mine if s.kind == 2]
        client = [s for s in mine if s.kind == 3]
        assert len(server) == 1 and len(client) == 1, mine
        assert (server[0].scope, client[0].scope) == SCOPES[instrumentation]
        assert client[0].span_id == parent_id
        assert client[0].parent_span_id == server[0].span_id
        assert server[0].service_name == "relay-wire"
        assert server[0].name == "GET /"
        access = [line for line in log_lines if line.get("logger") == "relay.access"]
        assert access and access[0]["trace_id"] == trace_id
        assert access[0]["span_id"] == server[0].span_id
        assert f'trace_id="{trace_id}"' in metrics
        # The admin listener is not traced: every server span is a proxied request.
        assert {s.attributes.get("url.path") for s in spans if s.kind == 2} == {
            "/headers",
            "/stream/100",
        }
        (cut,) = [s for s in spans if "client_disconnect" in s.events]
        assert cut.kind == 2 and cut.attributes["relay.reason"] == "client_disconnect"


@pytest.mark.live
@pytest.mark.parametrize("instrumentation", MODES)
def test_otlp_wire_sampled_out_requests_propagate_and_export_nothing(
    tmp_path: Path, instrumentation: str
) -> None:
    with otlp_receiver() as (endpoint, receiver):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
            "OTEL_TRACES_SAMPLER_ARG": "0",
        }
        config = demo_config()
        config["tracing"] = {"instrumentation": instrumentation}
        with spawn_relay(config, tmp_path, env) as relay:
            sent = [
                httpx.get(f"{relay.url}/headers").json()["headers"]["traceparent"] for _ in range(5)
            ]
            # The control: a caller that sampled its trace is followed, and its spans are
            # exported after any the requests above could have left (one queue, in order).
            control = "4bf92f3577b34da6a3ce929d0e0e4736"
            httpx.get(
                f"{relay.url}/headers", headers={"traceparent": f"00-{control}-00f067aa0ba902b7-01"}
            )
            spans = receiver.wait_for(lambda s: any(x.trace_id == control for x in s))
        assert all(TRACEPARENT.match(value) for value in sent), sent
        assert all(int(value[-2:], 16) & 1 == 0 for value in sent), sent  # not sampled
        assert len({value.split("-")[1] for value in sent}) == 5  # a trace per request
        assert [s for s in spans if s.trace_id != control] == []


@pytest.mark.live
def test_collector_down_never_fails_start_or_requests(tmp_path: Path) -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{closed_port()}",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "1",
    }
    with spawn_relay(demo_config(), tmp_path, env) as relay:
        for _ in range(20):
            assert httpx.get(f"{relay.url}/").status_code == 200
        assert httpx.get(f"{relay.admin_url}/readyz").status_code == 200


@pytest.mark.live
def test_every_worker_exports_its_own_spans(tmp_path: Path) -> None:
    with otlp_receiver() as (endpoint, receiver):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
            "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom"),
        }
        with spawn_relay(demo_config(workers=2), tmp_path, env) as relay:
            sent = set()
            for _ in range(30):
                with httpx.Client() as client:  # new connections spread over both workers
                    headers = client.get(f"{relay.url}/headers").json()["headers"]
                sent.add(headers["traceparent"].split("-")[1])

            def all_arrived(spans: list[ReceivedSpan]) -> bool:
                return sent <= {s.trace_id for s in spans if s.kind == 2}

            receiver.wait_for(all_arrived)


async def test_unsampled_requests_still_carry_trace_context(
    monkeypatch: pytest.MonkeyPatch, mode: Instrumentation
) -> None:
    # Sampled out: nothing recorded, but the upstream still joins the caller's trace, with
    # the sampled flag off, so its own spans follow the same decision.
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    tracing, exporter = in_memory(mode)
    upstream = ScriptedUpstream({"/ok": respond(200, b"ok")})
    inbound = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
    async with (
        upstream.running(),
        run_relay(one_upstream(upstream.url), tracing=tracing) as running,
        http_client() as client,
    ):
        response = await client.get(f"{running.url}/ok")
        assert response.status_code == 200, response.text
        await client.get(f"{running.url}/ok", headers={"traceparent": inbound})
    fresh, continued = (r.headers["traceparent"] for r in upstream.seen[-2:])
    match = TRACEPARENT.match(fresh)
    assert match, fresh
    assert continued.startswith("00-0af7651916cd43dd8448eb211c80319c-") and continued != inbound
    assert all(int(sent[-2:], 16) & 1 == 0 for sent in (fresh, continued))  # not sampled
    assert exporter.get_finished_spans() == ()


async def test_sampled_spans_carry_http_attributes(
    traced: tuple[RunningRelay, ScriptedUpstream, InMemorySpanExporter],
) -> None:
    running, _, exporter = traced
    async with http_client() as client:
        await client.get(f"{running.url}/ok?q=1", headers={"user-agent": "probe/1"})
    await eventually(lambda: len(exporter.get_finished_spans()) == 2)
    spans = exporter.get_finished_spans()
    (server,) = by_kind(spans, SpanKind.SERVER)
    (client_span,) = by_kind(spans, SpanKind.CLIENT)
    assert server.attributes is not None and client_span.attributes is not None
    assert server.attributes["http.request.method"] == "GET"
    assert server.attributes["url.path"] == "/ok"
    assert server.attributes["url.query"] == "q=1"
    assert server.attributes["user_agent.original"] == "probe/1"
    assert server.attributes["client.address"] == "127.0.0.1"
    assert client_span.attributes["http.request.method"] == "GET"
    assert str(client_span.attributes["url.full"]).endswith("/ok?q=1")
    assert client_span.attributes["server.address"] == "127.0.0.1"
