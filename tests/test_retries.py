"""Per-route retries over real sockets: each trigger of ``retry.on``, the methods and bodies
that may be sent again, the budget, the backoff, the spans of each attempt, and the pool
left idle afterwards."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.trace import SpanKind

from service import retries as retries_module
from service.config import ConfigError, load_settings
from service.retries import RetryBudget, RetryPolicy
from service.retry_config import RetryConfig
from service.telemetry.tracing import Instrumentation
from tests.support.http import http_client
from tests.support.logs import Records
from tests.support.metrics import metric
from tests.support.net import closed_port, eventually, port_of
from tests.support.relays import RunningRelay, one_upstream, pool_settled, run_relay
from tests.support.scripted import (
    Handler,
    Request,
    ScriptedUpstream,
    Writer,
    echo,
    hang,
    reset_mid_body,
    respond,
)
from tests.support.tracing import in_memory

pytestmark = pytest.mark.usefixtures("no_error_logs")
OK = respond(200, b"ok")


def retrying(url: str, transport: str = "aiohttp", **retry: Any) -> dict[str, Any]:
    """One upstream ``up`` behind ``/``, whose route retries (attempts 2, a 1 ms backoff
    unless given)."""
    config = one_upstream(url, transport, timeouts={"connect": 2, "read": 5})
    config["routes"][0]["retry"] = {"attempts": 2, "backoff_seconds": 0.001, **retry}
    return config


def failing_first(times: int, failure: Handler, then: Handler = OK) -> Handler:
    """``failure`` for the first ``times`` requests, then ``then``."""
    calls = 0

    async def handler(request: Request, writer: Writer) -> None:
        nonlocal calls
        calls += 1
        await (failure if calls <= times else then)(request, writer)

    return handler


async def close_unanswered(request: Request, writer: Writer) -> None:
    writer.close()


async def retries(relay: RunningRelay, reason: str | None = None) -> float:
    labels = {"upstream": "up"} | ({"reason": reason} if reason else {})
    return await metric(relay, "relay_upstream_retries_total", **labels)


async def exhausted(relay: RunningRelay) -> float:
    return await metric(relay, "relay_upstream_retry_budget_exhausted_total", upstream="up")


async def settled(relay: RunningRelay) -> None:
    """The pool is idle again: no slot held or waited for."""
    await eventually(lambda: pool_settled(relay))


@pytest.fixture
async def scripted() -> AsyncIterator[ScriptedUpstream]:
    async with ScriptedUpstream({}).running() as running:
        yield running


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_a_listed_status_is_retried_and_the_next_answer_served(
    scripted: ScriptedUpstream, transport: str, status: int, access: Records
) -> None:
    scripted.handlers |= {"/s": failing_first(1, respond(status, b"failed")), "/ok": OK}
    async with run_relay(retrying(scripted.url, transport, on=[str(status)])) as relay:
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
            assert (await client.get(f"{relay.url}/ok")).status_code == 200
        assert (response.status_code, response.content) == (200, b"ok")
        assert await retries(relay, f"status_{status}") == 1
        assert await retries(relay) == 1
        assert len(scripted.seen) == 3
        await settled(relay)
    assert [(r.path, r.retries, r.status) for r in access()] == [  # type: ignore[attr-defined]
        ("/s", 1, 200),
        ("/ok", None, 200),
    ]


async def test_a_status_not_listed_is_answered_as_it_is(scripted: ScriptedUpstream) -> None:
    """The default triggers are connect and reset: a 503 goes to the client unretried."""
    scripted.handlers["/s"] = failing_first(1, respond(503, b"busy"))
    async with run_relay(retrying(scripted.url)) as relay:
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
        assert (response.status_code, response.content) == (503, b"busy")
        assert "proxy-status" not in response.headers
        assert await retries(relay) == 0
        assert len(scripted.seen) == 1


async def test_a_connection_closed_before_a_response_is_retried(
    scripted: ScriptedUpstream, transport: str
) -> None:
    """A fresh connection closed without an answer: reason reset (not the stale keep-alive
    race, which the pool gate retries by itself)."""
    scripted.handlers["/s"] = failing_first(1, close_unanswered)
    async with run_relay(retrying(scripted.url, transport)) as relay:
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
        assert (response.status_code, response.content) == (200, b"ok")
        assert await retries(relay, "reset") == 1
        assert await retries(relay, "stale_connection") == 0
        assert [r.sequence for r in scripted.seen] == [0, 0]  # two fresh connections
        await settled(relay)


async def test_connect_refused_is_retried_until_the_attempts_run_out() -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    async with run_relay(retrying(url, attempts=3)) as relay:
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
        assert response.status_code == 502
        assert response.headers["proxy-status"] == 'relay; error=connection_refused; next-hop="up"'
        assert await retries(relay, "connect") == 3
        assert await exhausted(relay) == 0
        assert await metric(relay, "relay_upstream_errors_total", upstream="up") == 1
        await settled(relay)


async def test_connect_refused_then_accepted_is_served() -> None:
    """The port refuses the first attempt and listens from the moment the proxy decides to
    retry (told through its observer chain), so the second attempt connects."""
    upstream = ScriptedUpstream({"/s": OK})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    server = await asyncio.start_server(upstream.serve, sock=sock, start_serving=False)
    async with server, run_relay(retrying(f"http://127.0.0.1:{port_of(sock)}")) as relay:
        observers = relay.relay.observers
        notify = observers.retrying
        started: list[asyncio.Task[None]] = []

        def listen_then_notify(exchange: Any) -> None:
            started.append(asyncio.ensure_future(server.start_serving()))
            notify(exchange)

        observers.retrying = listen_then_notify  # type: ignore[method-assign]
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
        assert (response.status_code, response.content) == (200, b"ok")
        assert len(started) == 1
        assert await retries(relay, "connect") == 1
        await settled(relay)


@pytest.mark.parametrize("transport", ["aiohttp", "httpcore"])
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_without_a_policy_a_refused_connect_is_tried_once_more(
    transport: str, method: str
) -> None:
    """Nothing was sent, so any method, body included, goes once more on a new connection
    (to a Service address, it may reach another pod). The port listens from the moment the
    pool gate decides to retry."""
    upstream = ScriptedUpstream({"/s": echo})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
    server = await asyncio.start_server(upstream.serve, sock=sock, start_serving=False)
    config = one_upstream(f"http://127.0.0.1:{port_of(sock)}", transport)
    async with server, run_relay(config) as relay:
        metrics = relay.relay.metrics
        count = metrics.retry
        started: list[asyncio.Task[None]] = []

        def listen_then_count(name: str, reason: str) -> None:
            sock.listen()  # the retry's connection waits in the backlog
            started.append(asyncio.ensure_future(server.start_serving()))
            count(name, reason)

        metrics.retry = listen_then_count  # type: ignore[method-assign]
        body = b"x" * 3000 if method == "POST" else None
        async with http_client() as client:
            response = await client.request(method, f"{relay.url}/s", content=body)
        assert response.status_code == 200
        assert response.content == (body or b"")
        assert len(started) == 1
        assert await retries(relay, "connect") == 1
        await settled(relay)


async def test_without_a_policy_a_refused_connect_is_tried_only_once_more() -> None:
    async with run_relay(one_upstream(f"http://127.0.0.1:{closed_port()}")) as relay:
        async with http_client() as client:
            response = await client.post(f"{relay.url}/s", content=b"body")
        assert response.status_code == 502
        assert response.headers["proxy-status"] == 'relay; error=connection_refused; next-hop="up"'
        assert await retries(relay, "connect") == 1
        assert await metric(relay, "relay_upstream_errors_total", upstream="up") == 1
        await settled(relay)


async def test_read_timeout_is_retried_only_when_listed(scripted: ScriptedUpstream) -> None:
    scripted.handlers["/s"] = failing_first(1, hang)
    config = retrying(scripted.url, on=["read_timeout"])
    config["upstreams"]["up"]["timeouts"] = {"read": 0.2}
    async with run_relay(config) as relay:
        async with http_client() as client:
            response = await client.get(f"{relay.url}/s")
        assert (response.status_code, response.content) == (200, b"ok")
        assert await retries(relay, "read_timeout") == 1
        await settled(relay)


@pytest.mark.parametrize("listed", [False, True])
async def test_post_is_retried_only_when_listed(scripted: ScriptedUpstream, listed: bool) -> None:
    scripted.handlers["/s"] = failing_first(1, respond(503, b"busy"), echo)
    retry: dict[str, Any] = {"on": ["503"]}
    if listed:
        retry["methods"] = ["GET", "post"]
    async with run_relay(retrying(scripted.url, **retry)) as relay:
        async with http_client() as client:
            response = await client.post(f"{relay.url}/s", content=b"order 66")
        if listed:
            assert (response.status_code, response.content) == (200, b"order 66")
            assert [r.body for r in scripted.seen] == [b"order 66"] * 2
        else:
            assert (response.status_code, response.content) == (503, b"busy")
            assert [r.body for r in scripted.seen] == [b"order 66"]
        assert await retries(relay) == (1 if listed else 0)
        await settled(relay)


async def test_no_retry_once_the_response_body_started(scripted: ScriptedUpstream) -> None:
    """An upstream that resets mid-body: the client already has the status and some bytes,
    so the exchange is cut, never sent again."""
    scripted.handlers["/s"] = reset_mid_body
    async with run_relay(retrying(scripted.url, on=["reset", "502"])) as relay:
        async with http_client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{relay.url}/s")
        assert len(scripted.seen) == 1
        assert await retries(relay) == 0
        await settled(relay)


async def test_a_client_gone_during_the_backoff_ends_the_exchange(
    scripted: ScriptedUpstream,
) -> None:
    """The wait before a retry (here at least 2.5 s) is cut short by the client hanging up:
    no retry is sent, the exchange is a 499 and the pool is idle again."""
    scripted.handlers["/s"] = respond(503)
    async with run_relay(retrying(scripted.url, on=["503"], backoff_seconds=5)) as relay:
        async with http_client(timeout=0.3) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{relay.url}/s")

        async def hung_up() -> float:
            return await metric(relay, "relay_requests_total", upstream="up", code="499")

        for _ in range(100):
            if await hung_up() == 1:
                break
            await asyncio.sleep(0.02)
        assert await hung_up() == 1
        assert len(scripted.seen) == 1
        assert await retries(relay) == 1  # decided, then abandoned with the client
        await settled(relay)


async def test_a_body_on_a_stale_connection_is_sent_again_on_a_new_one(
    scripted: ScriptedUpstream, transport: str
) -> None:
    """Two pooled connections, both dropped by the upstream when reused: the PUT fails on
    one (reason reset), and its retry must not take the other."""

    async def stale_when_reused(request: Request, writer: Writer) -> None:
        if request.sequence >= 1:
            writer.close()
            return
        await asyncio.sleep(0.05)  # the two warm-up requests overlap: two connections
        await echo(request, writer)

    scripted.handlers["/s"] = stale_when_reused
    async with run_relay(retrying(scripted.url, transport, attempts=1)) as relay:
        async with http_client() as client:
            warm = await asyncio.gather(*(client.get(f"{relay.url}/s") for _ in range(2)))
            assert [r.status_code for r in warm] == [200, 200]
            assert scripted.peak_connections == 2
            response = await client.put(f"{relay.url}/s", content=BODY)
        assert (response.status_code, response.content) == (200, BODY)
        assert await retries(relay, "reset") == 1
        assert await retries(relay, "stale_connection") == 0  # the gate replays no body
        await settled(relay)


BODY = bytes(range(256)) * 40  # 10 KiB, every byte value


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_buffered_body_is_sent_again_byte_for_byte(
    scripted: ScriptedUpstream, transport: str, framing: str
) -> None:
    scripted.handlers["/s"] = failing_first(1, respond(503), echo)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(BODY), 3000):
            yield BODY[start : start + 3000]

    content: Any = BODY if framing == "content-length" else chunks()
    async with run_relay(retrying(scripted.url, transport, on=["503"])) as relay:
        async with http_client() as client:
            response = await client.put(f"{relay.url}/s", content=content)
        assert (response.status_code, response.content) == (200, BODY)
        assert [r.body for r in scripted.seen] == [BODY, BODY]
        assert await retries(relay, "status_503") == 1
        await settled(relay)


async def test_a_body_over_max_body_bytes_is_streamed_and_not_retried(
    scripted: ScriptedUpstream,
) -> None:
    scripted.handlers["/s"] = failing_first(1, respond(503, b"busy"), echo)
    async with run_relay(retrying(scripted.url, on=["503"], max_body_bytes=1024)) as relay:
        async with http_client() as client:
            response = await client.put(f"{relay.url}/s", content=BODY)
        assert (response.status_code, response.content) == (503, b"busy")
        assert [r.body for r in scripted.seen] == [BODY]
        assert await retries(relay) == 0
        await settled(relay)


async def test_the_budget_bounds_retries_of_a_failing_upstream(
    scripted: ScriptedUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20% of 20 requests: 4 retries; every refusal is counted and answered with the
    upstream's own failure. (The window is made long enough that however slowly the
    machine runs the requests, they all fall in it.)"""
    monkeypatch.setattr(RetryBudget, "WINDOW", 600)
    scripted.handlers["/s"] = respond(503, b"busy")
    config = retrying(scripted.url, on=["503"], budget_percent=20, budget_min_retries=0)
    async with run_relay(config) as relay:
        async with http_client() as client:
            for _ in range(20):
                response = await client.get(f"{relay.url}/s")
                assert (response.status_code, response.content) == (503, b"busy")
        # The 5th, 10th, 15th and 20th request each got one retry (20% of the requests so
        # far); none ever got its second.
        assert await retries(relay, "status_503") == 4
        assert len(scripted.seen) == 24
        assert await exhausted(relay) == 20
        await settled(relay)


async def test_the_budget_counts_every_request_to_the_upstream(
    scripted: ScriptedUpstream,
) -> None:
    """Requests of a route without retries to the same upstream count in its budget: after
    4 of them, 50% of 5 leaves room for 2 retries; on its own the failing request would
    have none (50% of 1)."""
    scripted.handlers |= {"/plain": OK, "/s": failing_first(1, respond(503))}
    config = retrying(scripted.url, on=["503"], budget_percent=50, budget_min_retries=0)
    config["routes"].insert(0, {"name": "plain", "prefix": "/plain", "upstream": "up"})
    async with run_relay(config) as relay:
        async with http_client() as client:
            for _ in range(4):
                assert (await client.get(f"{relay.url}/plain")).status_code == 200
            assert (await client.get(f"{relay.url}/s")).status_code == 200
        assert await retries(relay, "status_503") == 1
        assert await exhausted(relay) == 0


async def test_a_quiet_upstream_still_retries_within_the_floor(
    scripted: ScriptedUpstream,
) -> None:
    """budget_min_retries (3 by default) allows retries the share alone would not."""
    scripted.handlers["/s"] = failing_first(2, respond(503))
    async with run_relay(retrying(scripted.url, on=["503"])) as relay:
        async with http_client() as client:
            assert (await client.get(f"{relay.url}/s")).status_code == 200
        assert await retries(relay) == 2
        assert await exhausted(relay) == 0


async def test_backoff_waits_between_attempts(scripted: ScriptedUpstream) -> None:
    """0.1 s doubling, jittered between half and all of it: two retries wait at least
    0.05 + 0.1 s (a lower bound only: a loaded machine can only make it slower)."""
    scripted.handlers["/s"] = respond(503)
    async with run_relay(retrying(scripted.url, on=["503"], backoff_seconds=0.1)) as relay:
        async with http_client() as client:
            started = time.monotonic()
            assert (await client.get(f"{relay.url}/s")).status_code == 503
            took = time.monotonic() - started
        assert await retries(relay) == 2
        assert 0.15 <= took < 10


def test_backoff_doubles_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy.of(RetryConfig(attempts=10, backoff_seconds=0.1))
    for retry, interval in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        delays = [policy.delay(retry) for _ in range(200)]
        assert all(interval / 2 <= d <= interval for d in delays), retry
        assert max(delays) - min(delays) > interval / 10  # jittered, not fixed


def test_the_budget_window_slides(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(retries_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    budget = RetryBudget()
    for _ in range(10):
        budget.request()
    assert [budget.allow(20, 0) for _ in range(3)] == [True, True, False]
    assert budget.allow(20, 3)  # the floor: a third retry in the window
    assert not budget.allow(20, 3)
    now[0] += 9.5  # the same window: requests and retries still count
    assert not budget.allow(20, 3)
    now[0] += 1  # their second has left the window: nothing counts any more
    assert not budget.allow(20, 0)
    for _ in range(5):
        budget.request()
    assert [budget.allow(20, 0), budget.allow(20, 0)] == [True, False]  # 20% of 5
    assert budget.allow(20, 2)


@pytest.mark.parametrize("mode", ["stock", "native"])
async def test_each_attempt_is_a_client_span(
    scripted: ScriptedUpstream, mode: Instrumentation
) -> None:
    scripted.handlers["/s"] = failing_first(1, respond(503))
    tracing, exporter = in_memory(mode)
    async with run_relay(retrying(scripted.url, on=["503"]), tracing=tracing) as relay:
        async with http_client() as client:
            assert (await client.get(f"{relay.url}/s")).status_code == 200

        def server_spans() -> int:
            return sum(s.kind is SpanKind.SERVER for s in exporter.get_finished_spans())

        await eventually(lambda: server_spans() == 1)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    attempts = [s for s in spans if s.kind is SpanKind.CLIENT]
    assert server.context is not None
    assert [a.parent.span_id if a.parent else None for a in attempts] == [
        server.context.span_id
    ] * 2
    assert [(a.attributes or {}).get("http.response.status_code") for a in attempts] == [503, 200]
    resends = [(a.attributes or {}).get("http.request.resend_count") for a in attempts]
    assert resends == [None, 1]
    (event,) = [e for e in server.events if e.name == "retry"]
    assert dict(event.attributes or {}) == {
        "relay.retry.reason": "status_503",
        "http.request.resend_count": 1,
    }
    # Each attempt carried its own span's context upstream.
    sent = [r.headers["traceparent"].split("-")[2] for r in scripted.seen]
    assert sent == [format(a.context.span_id, "016x") for a in attempts if a.context]


def test_retry_series_start_at_zero_for_the_policy_reasons() -> None:
    from service.telemetry.metrics import Metrics

    metrics = Metrics()
    metrics.start_at_zero(["a", "b"], [], [], {"a": {"connect", "status_503"}})
    text = metrics.render(None)[0].decode()
    assert 'relay_upstream_retries_total{reason="status_503",upstream="a"} 0.0' in text
    # The pool gate's own reasons are every upstream's.
    for upstream in ("a", "b"):
        for reason in ("stale_connection", "connect"):
            line = f'relay_upstream_retries_total{{reason="{reason}",upstream="{upstream}"}} 0.0'
            assert line in text
    assert 'relay_upstream_retries_total{reason="status_503",upstream="b"}' not in text
    assert 'relay_upstream_retry_budget_exhausted_total{upstream="a"} 0.0' in text
    assert 'relay_upstream_retry_budget_exhausted_total{upstream="b"}' not in text


def write_config(tmp_path: Path, retry: str) -> Path:
    path = tmp_path / "relay.yaml"
    path.write_text(
        "upstreams: {up: {url: 'http://127.0.0.1:9'}}\n"
        f"routes:\n  - prefix: /\n    upstream: up\n    retry: {retry}\n"
    )
    return path


def test_retry_config_reads_yaml_as_written(tmp_path: Path) -> None:
    """``on`` unquoted (YAML 1.1 reads the key as true) and statuses as numbers."""
    settings = load_settings(write_config(tmp_path, "{attempts: 1, on: [connect, 503]}"))
    retry = settings.routes[0].retry
    assert (retry.attempts, retry.on) == (1, ("connect", "503"))
    assert retry.methods == ("GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE")
    assert (retry.budget_percent, retry.backoff_seconds, retry.max_body_bytes) == (
        20.0,
        0.025,
        65536,
    )


@pytest.mark.parametrize(
    ("retry", "message"),
    [
        ("{on: [500]}", "routes.0.retry.on.0: Input should be 'connect', 'reset'"),
        ("{methods: [CONNECT]}", "routes.0.retry.methods: CONNECT is never proxied"),
        ("{on: [reset, reset]}", "routes.0.retry.on: 'reset' listed twice"),
        ("{attempts: -1}", "routes.0.retry.attempts: Input should be greater than or equal"),
        ("{budget_percent: 150}", "routes.0.retry.budget_percent: Input should be less than"),
        ("{tries: 2}", "routes.0.retry.tries: unknown field"),
        ("{attempts: 1, on: []}", "routes.0.retry: on: empty, so attempts never apply"),
    ],
)
def test_bad_retry_config_names_the_field(tmp_path: Path, retry: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(write_config(tmp_path, retry))
    assert message in str(caught.value)


def test_the_readme_documents_every_retry_field_with_its_default() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    reference = readme.split("## Configuration", 1)[1].split("```yaml\n", 1)[1].split("```")[0]
    (route,) = yaml.safe_load(reference)["routes"]
    documented = {("on" if key is True else key): v for key, v in route["retry"].items()}
    assert set(documented) == set(RetryConfig.model_fields)
    assert RetryConfig.model_validate(documented) == RetryConfig()
