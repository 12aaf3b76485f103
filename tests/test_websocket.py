"""WebSocket sessions through the proxy, over real sockets: a real ``websockets`` upstream on
127.0.0.1, the proxy in the test process, and the ``websockets`` client."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trustme
from opentelemetry.trace import SpanKind
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from service.session import SessionResult
from service.telemetry.tracing import Instrumentation
from tests.support.metrics import exposition_async, metric, samples, value
from tests.support.net import closed_port, eventually
from tests.support.relays import RunningRelay, one_upstream, run_relay
from tests.support.tls import server_context
from tests.support.tracing import in_memory
from tests.support.wire import connect as connect_raw
from tests.support.wire import head, parse_response_head, raw_exchange
from tests.support.ws_upstream import REFUSAL_BODY, WsUpstream, settled, ws_upstream

pytestmark = pytest.mark.timeout(30)

Start = Callable[..., Any]


@asynccontextmanager
async def proxied(**config: Any) -> AsyncIterator[tuple[WsUpstream, RunningRelay, str]]:
    """A WebSocket upstream, a relay in front of it (``config``: extra top-level settings,
    ``route``: extra route fields), and the relay's ws:// base URL."""
    route = config.pop("route", {})
    upstream_options = config.pop("upstream", {})
    async with AsyncExitStack() as stack:
        up = await stack.enter_async_context(ws_upstream())
        settings = one_upstream(up.url, **upstream_options)
        settings["routes"][0].update(route)
        relay = await stack.enter_async_context(run_relay({**settings, **config}))
        yield up, relay, relay.url.replace("http://", "ws://")


def client(url: str, **options: Any) -> Any:
    return connect(url, compression=None, open_timeout=5, close_timeout=2, **options)


async def sessions_closed(relay: RunningRelay) -> None:
    """Wait until the relay has ended every session (its gauge back to 0)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 5
    while await metric(relay, "relay_websocket_sessions_active") != 0:
        assert loop.time() < deadline, "sessions still open at the relay"
        await asyncio.sleep(0.02)


async def closed_with(ws: ClientConnection) -> tuple[int | None, str | None]:
    """The close code and reason the proxy sent, once the session ended."""
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    await ws.wait_closed()
    return ws.close_code, ws.close_reason


async def test_text_and_binary_echo_both_ways_with_the_header_rules(no_error_logs: None) -> None:
    async with (
        proxied() as (up, _relay, base),
        client(
            base + "/chat?room=1",
            additional_headers={
                "X-Forwarded-For": "6.6.6.6",
                "X-Custom": "kept",
                "Keep-Alive": "1",
            },
        ) as ws,
    ):
        await ws.send("héllo")
        assert await ws.recv() == "héllo"
        await ws.send(b"\x00\xff" * 10)
        assert await ws.recv() == b"\x00\xff" * 10
        response = ws.response
        assert response is not None
        assert response.headers["via"] == "1.1 relay"
        assert len(response.headers["x-request-id"]) == 32
    (request,) = up.handshakes
    headers = request.headers
    assert request.path == "/chat?room=1"
    assert headers["host"] == f"127.0.0.1:{up.port}"  # rewritten to the upstream's
    assert headers["x-forwarded-for"] == "127.0.0.1"  # an untrusted peer's claim dropped
    assert headers["x-forwarded-proto"] == "http"
    assert headers["via"] == "1.1 relay"
    assert headers["x-custom"] == "kept"
    assert "keep-alive" not in headers  # hop-by-hop
    assert headers["x-request-id"] == response.headers["x-request-id"]
    assert headers.get_all("sec-websocket-key") != [] and len(headers.get_all("host")) == 1


async def test_base_path_and_prefix_rewrite_as_for_http(no_error_logs: None) -> None:
    async with ws_upstream() as up:
        config = {
            "upstreams": {"up": {"url": up.url + "/base"}},
            "routes": [{"prefix": "/ws", "upstream": "up", "strip_prefix": True}],
        }
        async with run_relay(config) as relay:
            base = relay.url.replace("http://", "ws://")
            async with client(base + "/ws/feed?x=1") as ws:
                await ws.send("a")
                assert await ws.recv() == "a"
    assert up.handshakes[0].path == "/base/feed?x=1"


async def test_preserve_host_sends_the_clients_host(no_error_logs: None) -> None:
    async with (
        proxied(upstream={"preserve_host": True}) as (up, relay, base),
        client(base + "/echo") as ws,
    ):
        await ws.send("a")
        assert await ws.recv() == "a"
    assert up.handshakes[0].headers["host"] == relay.url.removeprefix("http://")


async def test_subprotocols_offered_upstream_and_its_choice_returned(no_error_logs: None) -> None:
    async with proxied() as (up, _, base):
        async with client(base + "/", subprotocols=["zeta", "chat.v1", "chat.v2"]) as ws:
            assert ws.subprotocol == "chat.v2"
        async with client(base + "/", subprotocols=["zeta"]) as ws:
            assert ws.subprotocol is None
    assert up.handshakes[0].headers["sec-websocket-protocol"] == "zeta, chat.v1, chat.v2"


async def test_upstream_refusal_is_returned_as_sent(no_error_logs: None) -> None:
    async with proxied() as (_up, relay, base):
        with pytest.raises(InvalidStatus) as refused:
            async with client(base + "/refuse"):
                pass
        response = refused.value.response
        assert response.status_code == 403
        assert response.body == REFUSAL_BODY
        assert response.headers["x-why"] == "refused"
        assert response.headers["via"] == "1.1 relay"
        assert "proxy-status" not in response.headers  # the upstream's answer, not ours
        labels = {"upstream": "up", "route": "up"}
        assert await metric(relay, "relay_websocket_sessions_total", **labels,
                            result="upstream_refused") == 1  # fmt: skip
        assert await metric(relay, "relay_requests_total", code="403") == 1


async def test_close_codes_and_reasons_pass_both_ways(no_error_logs: None) -> None:
    async with proxied() as (up, relay, base):
        async with client(base + "/close/4001") as ws:
            assert await closed_with(ws) == (4001, "bye")
        async with client(base + "/echo") as ws:
            await ws.close(4002, "later")
        await eventually(lambda: (4002, "later") in up.closes)
        labels = {"upstream": "up", "route": "up"}
        await eventually(lambda: len(up.closes) == 2)
        assert await metric(relay, "relay_websocket_sessions_total", **labels,
                            result="upstream_closed") == 1  # fmt: skip
        assert await metric(relay, "relay_websocket_sessions_total", **labels,
                            result="client_closed") == 1  # fmt: skip


async def test_client_vanishing_frees_the_upstream_session_and_counts(no_error_logs: None) -> None:
    async with proxied() as (up, relay, base):
        ws = await client(base + "/echo")
        await ws.send("x")
        assert await ws.recv() == "x"
        assert up.open
        ws.transport.abort()  # gone, without a close frame
        await settled(up)
        assert up.closes == [(1001, "client connection lost")]
        await sessions_closed(relay)
        assert await metric(relay, "relay_disconnects_total", side="client", phase="session") == 1


async def test_upstream_vanishing_closes_the_client_with_1011(no_error_logs: None) -> None:
    async with proxied() as (_up, relay, base), client(base + "/vanish") as ws:
        await ws.send("x")
        assert await closed_with(ws) == (1011, "upstream connection lost")
        assert await metric(relay, "relay_disconnects_total", side="upstream", phase="session") == 1
        assert await metric(relay, "relay_upstream_errors_total", reason="reset") == 1


async def test_idle_sessions_close_with_1001(no_error_logs: None) -> None:
    async with proxied(websocket={"idle_timeout_seconds": 0.3}) as (up, relay, base):
        async with client(base + "/echo") as ws:
            await ws.send("keep")
            assert await ws.recv() == "keep"
            assert await closed_with(ws) == (1001, "idle timeout")
        await settled(up)
        assert up.closes == [(1001, "idle timeout")]
        assert await metric(relay, "relay_websocket_sessions_total", result="idle") == 1


async def test_messages_over_the_limit_close_with_1009(no_error_logs: None) -> None:
    async with proxied(websocket={"max_message_bytes": 1024}) as (up, relay, base):
        async with client(base + "/echo") as ws:
            await ws.send(b"x" * 1024)  # at the limit: relayed
            assert await ws.recv() == b"x" * 1024
            await ws.send(b"x" * 1025)
            code, _ = await closed_with(ws)
            assert code == 1009
        await settled(up)
        assert up.closes[-1][0] == 1009
        async with client(base + "/big/2000") as ws:  # the upstream's message too large
            assert (await closed_with(ws))[0] == 1009
        assert await metric(relay, "relay_websocket_sessions_total", result="too_large") == 2


async def test_route_without_websocket_answers_403_and_never_goes_upstream(
    no_error_logs: None,
) -> None:
    async with proxied(route={"websocket": False}) as (up, _relay, base):
        with pytest.raises(InvalidStatus) as refused:
            async with client(base + "/echo"):
                pass
        response = refused.value.response
        assert response.status_code == 403
        assert response.headers["proxy-status"] == (
            'relay; error=http_request_denied; next-hop="up"'
        )
        assert up.handshakes == []


async def test_sessions_over_the_upstream_cap_get_503_with_retry_after(
    no_error_logs: None,
) -> None:
    async with proxied(websocket={"max_sessions_per_upstream": 1}) as (up, relay, base):
        async with client(base + "/echo") as first:
            with pytest.raises(InvalidStatus) as refused:
                async with client(base + "/echo"):
                    pass
            response = refused.value.response
            assert response.status_code == 503
            assert response.headers["retry-after"] == "1"
            assert "connection_limit_reached" in response.headers["proxy-status"]
            await first.send("still here")
            assert await first.recv() == "still here"
        assert len(up.handshakes) == 1
        await sessions_closed(relay)
        async with client(base + "/echo") as again:  # the slot came back
            await again.send("y")
            assert await again.recv() == "y"


async def test_unreachable_upstream_is_502_before_any_session(no_error_logs: None) -> None:
    from tests.support.net import closed_port

    config = one_upstream(f"http://127.0.0.1:{closed_port()}")
    async with run_relay(config) as relay:
        with pytest.raises(InvalidStatus) as refused:
            async with client(relay.url.replace("http://", "ws://") + "/"):
                pass
        assert refused.value.response.status_code == 502
        assert "connection_refused" in refused.value.response.headers["proxy-status"]
        assert await metric(relay, "relay_websocket_sessions_total", result="error") == 1


async def test_ten_mebibytes_in_64_kib_messages_with_flat_memory(no_error_logs: None) -> None:
    import psutil

    process = psutil.Process()
    chunk = bytes(range(256)) * 256  # 64 KiB
    count = 160  # 10 MiB
    async with proxied() as (_, relay, base), client(base + "/echo", max_size=None) as ws:
        baseline = process.memory_info().rss
        peak = baseline

        async def sender() -> None:
            for _ in range(count):
                await ws.send(chunk)

        task = asyncio.create_task(sender())
        for _ in range(count):
            assert await ws.recv() == chunk
            peak = max(peak, process.memory_info().rss)
        await task
        # The proxy holds a few messages at a time, never the stream: well under its size.
        assert peak - baseline < 8 << 20, (peak - baseline) >> 20
        await ws.close()
        for direction in ("to_upstream", "to_client"):
            labels = {"upstream": "up", "direction": direction}
            assert await metric(relay, "relay_websocket_messages_total", **labels) == count
            assert await metric(relay, "relay_websocket_bytes_total", **labels) == count * len(
                chunk
            )


async def test_one_access_line_per_session(
    caplog: pytest.LogCaptureFixture, no_error_logs: None
) -> None:
    caplog.set_level(logging.INFO, logger="relay.access")
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    async with proxied() as (_up, _relay, base):
        async with client(base + "/echo") as ws:
            for text in ("a", "bc"):
                await ws.send(text)
                await ws.recv()
            await ws.close(4000, "done")

        def lines() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "relay.access"]

        await eventually(lambda: len(lines()) == 1)
    (line,) = lines()
    # uvicorn's own lines for the handshake and the session are left out: this one says it.
    assert [r.getMessage() for r in caplog.records if r.name == "uvicorn.error"] == []
    fields = line.__dict__
    assert fields["status"] == 101
    assert fields["ws_result"] == "client_closed"
    assert fields["ws_close_code"] == 4000
    assert fields["ws_closed_by"] == "client"
    assert fields["ws_messages_to_upstream"] == 2 and fields["ws_messages_to_client"] == 2
    assert fields["ws_bytes_to_upstream"] == 3 and fields["ws_bytes_to_client"] == 3
    assert fields["ws_session_ms"] is not None


async def test_session_gauge_and_duration(no_error_logs: None) -> None:
    async with proxied() as (up, relay, base):
        async with client(base + "/echo") as ws:
            await ws.send("a")
            await ws.recv()
            assert await metric(relay, "relay_websocket_sessions_active", upstream="up") == 1
            assert await metric(relay, "relay_requests_in_flight", upstream="up") == 0
        await settled(up)
        await sessions_closed(relay)
        count = await metric(relay, "relay_websocket_session_duration_seconds_count")
        assert count == 1
        # A session is not a request: the request latency histogram does not see it.
        assert await metric(relay, "relay_request_duration_seconds_count") == 0
        assert await metric(relay, "relay_requests_total", code="101") == 1


HANDSHAKE = (
    "GET /echo HTTP/1.1",
    "Host: relay.test",
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
)


def handshake(
    *, drop: str = "", add: tuple[str, ...] = (), first: str = "", body: bytes = b""
) -> bytes:
    lines = [line for line in HANDSHAKE if not drop or not line.startswith(drop)]
    if first:
        lines[0] = first
    return head(*lines, *add, body=body)


@pytest.mark.parametrize(
    ("request_bytes", "detail"),
    [
        (handshake(drop="Sec-WebSocket-Key"), "without one Sec-WebSocket-Key"),
        (
            handshake(drop="Sec-WebSocket-Key", add=("Sec-WebSocket-Key: c2hvcnQ=",)),
            "invalid Sec-WebSocket-Key",
        ),
        (
            handshake(drop="Sec-WebSocket-Version", add=("Sec-WebSocket-Version: 8",)),
            "unsupported Sec-WebSocket-Version",
        ),
        (handshake(drop="Sec-WebSocket-Version"), "unsupported Sec-WebSocket-Version"),
        (handshake(add=("Content-Length: 5",), body=b"hello"), "request body with Upgrade"),
        (handshake(first="POST /echo HTTP/1.1"), "not a GET"),
        (handshake(drop="Connection"), "Upgrade: websocket without Connection: upgrade"),
    ],
    ids=["no-key", "bad-key", "version-8", "no-version", "body", "post", "no-connection"],
)
async def test_hostile_handshakes_get_400_and_never_reach_the_upstream(
    request_bytes: bytes, detail: str, no_error_logs: None
) -> None:
    async with proxied() as (up, relay, _):
        answer = await raw_exchange(relay.url, request_bytes, within=5)
        status, headers = parse_response_head(answer.split(b"\r\n\r\n", 1)[0])
        assert status == 400, answer
        assert detail in answer.decode("latin-1"), answer
        assert headers["proxy-status"] == "relay; error=http_request_error"
        assert up.handshakes == []


async def test_a_valid_raw_handshake_is_switched(no_error_logs: None) -> None:
    # The control for the hostile cases: the same bytes, whole, open a session.
    async with proxied() as (up, relay, _):
        reader, writer = await connect_raw(relay.url)
        try:
            writer.write(handshake())
            answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert answer.startswith(b"HTTP/1.1 101 ")
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in answer  # RFC 6455's sample accept
        finally:
            writer.close()
        assert len(up.handshakes) == 1


async def test_drain_gives_sessions_the_grace_period_then_1001(
    caplog: pytest.LogCaptureFixture, no_error_logs: None
) -> None:
    caplog.set_level(logging.INFO, logger="relay.server")
    config = {"server": {"grace_period_seconds": 0.5}}
    async with proxied(**config) as (up, relay, base), client(base + "/echo") as ws:
        relay.service.request_shutdown()
        await eventually(lambda: relay.relay.health.draining)
        await ws.send("still served")  # not closed at once (uvicorn's own would be 1012)
        assert await ws.recv() == "still served"
        assert await closed_with(ws) == (1001, "proxy shutting down")
        await settled(up)
        assert up.closes == [(1001, "proxy shutting down")]
        text, _ = relay.relay.metrics.render(None)
        values = samples(text.decode())
        assert value(values, "relay_websocket_sessions_total", result="drain") == 1
        assert value(values, "relay_websocket_sessions_active") == 0
    # The drain working as it should: said at INFO, never a warning of requests cut.
    drain = [r for r in caplog.records if r.name == "relay.server" and "grace period" in r.msg]
    assert [(r.levelno, r.getMessage()) for r in drain] == [
        (
            logging.INFO,
            "grace period (0.5s) over: 1 WebSocket session closed with 1001 (going away)",
        )
    ]


async def test_200_sessions_dropped_at_random_points_leave_nothing_behind(
    no_error_logs: None,
) -> None:
    chooser = random.Random(21)
    points = [chooser.randrange(5) for _ in range(200)]

    async def one(point: int, url: str, base: str) -> None:
        if point < 2:  # before the handshake is answered: part of the head, or all of it
            _, writer = await connect_raw(url)
            writer.write(handshake()[: 40 if point == 0 else None])
            await writer.drain()
            writer.transport.abort()
            return
        ws = await client(base + "/echo")
        if point >= 3:
            await ws.send("m")
        if point == 4:
            assert await ws.recv() == "m"
            await ws.close()
            return
        ws.transport.abort()  # open (and maybe mid-message): gone without a close frame

    async with proxied() as (up, relay, base):
        limit = asyncio.Semaphore(50)

        async def bounded(point: int) -> None:
            async with limit:
                await one(point, relay.url, base)

        await asyncio.gather(*(bounded(p) for p in points))
        await settled(up, within=10)
        await sessions_closed(relay)
        assert relay.relay.proxy._sessions.open.get("up", 0) == 0
        assert await metric(relay, "relay_requests_in_flight") == 0
        opened = sum(1 for p in points if p >= 2)
        total = await metric(relay, "relay_websocket_sessions_total")
        assert total >= opened  # and the handshakes the upstream saw before the client went
        assert await metric(relay, "relay_disconnects_total", phase="session") == sum(
            1 for p in points if p in (2, 3)
        )


@pytest.mark.parametrize("mode", ["stock", "native"])
async def test_one_server_span_per_session_with_its_close_code(
    mode: Instrumentation, no_error_logs: None
) -> None:
    tracing, exporter = in_memory(mode)
    async with ws_upstream() as up, run_relay(one_upstream(up.url), tracing=tracing) as relay:
        base = relay.url.replace("http://", "ws://")
        async with client(base + "/echo") as ws:
            for _ in range(3):
                await ws.send("m")
                await ws.recv()
            await ws.close(4000, "done")
        await sessions_closed(relay)
    servers = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in servers]
    (span,) = servers
    attributes = span.attributes or {}
    assert attributes["relay.websocket.close_code"] == 4000
    assert attributes["relay.websocket.closed_by"] == "client"
    assert attributes["relay.websocket.result"] == "client_closed"
    assert attributes["relay.websocket.messages_to_upstream"] == 3
    assert attributes["relay.upstream"] == "up"
    # The upstream continues the session's trace.
    traceparent = up.handshakes[0].headers["traceparent"]
    assert traceparent.split("-")[1] == format(span.context.trace_id, "032x")


async def test_pings_are_answered_on_both_hops(no_error_logs: None) -> None:
    async with proxied() as (_up, _relay, base), client(base + "/ping") as ws:
        assert await ws.recv() == "pong received"  # the upstream's ping, answered by Relay
        latency = await asyncio.wait_for(await ws.ping(b"client ping"), 5)
        assert latency >= 0  # the client's ping, answered by Relay


async def test_session_series_start_at_zero() -> None:
    async with ws_upstream() as up:
        config = {
            "upstreams": {"up": {"url": up.url}},
            "routes": [
                {"name": "live", "prefix": "/live", "upstream": "up"},
                {"name": "plain", "prefix": "/", "upstream": "up", "websocket": False},
            ],
        }
        async with run_relay(config) as relay:
            got = samples(await exposition_async(relay.admin_url))
    assert value(got, "relay_websocket_sessions_active", upstream="up") == 0
    for direction in ("to_upstream", "to_client"):
        for family in ("relay_websocket_messages_total", "relay_websocket_bytes_total"):
            key = (family, frozenset({("upstream", "up"), ("direction", direction)}))
            assert got.get(key) == 0, key
    for side in ("client", "upstream"):
        key = (
            "relay_disconnects_total",
            frozenset({("upstream", "up"), ("side", side), ("phase", "session")}),
        )
        assert got.get(key) == 0, key
    results = {
        dict(labels)["result"]
        for name, labels in got
        if name == "relay_websocket_sessions_total" and dict(labels)["route"] == "live"
    }
    assert results == {r.value for r in SessionResult}
    assert not [
        labels
        for name, labels in got
        if name == "relay_websocket_sessions_total" and dict(labels)["route"] == "plain"
    ]


async def test_wss_upstream_with_the_upstreams_tls_settings(
    tmp_path: Path, no_error_logs: None
) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    async with ws_upstream(tls=server_context(ca.issue_cert("127.0.0.1"))) as up:
        trusted = one_upstream(up.url, tls={"ca_file": str(ca_file)})
        async with (
            run_relay(trusted) as relay,
            client(relay.url.replace("http://", "ws://") + "/echo") as ws,
        ):
            await ws.send("over tls")
            assert await ws.recv() == "over tls"
        async with run_relay(one_upstream(up.url)) as relay:  # the private CA unknown
            with pytest.raises(InvalidStatus) as refused:
                async with client(relay.url.replace("http://", "ws://") + "/echo"):
                    pass
            response = refused.value.response
            assert response.status_code == 502
            assert response.headers["proxy-status"] == (
                'relay; error=tls_certificate_error; next-hop="up"'
            )
            assert await metric(relay, "relay_upstream_errors_total", reason="tls") == 1


@pytest.mark.parametrize(
    ("section", "route_value", "env", "message"),
    [
        (
            "websocket: {max_message_bytes: 10}\n",
            "true",
            {},
            "websocket.max_message_bytes: Input should be greater than or equal to 125",
        ),
        (
            "",
            "true",
            {"RELAY_WEBSOCKET__IDLE_TIMEOUT_SECONDS": "0"},
            "RELAY_WEBSOCKET__IDLE_TIMEOUT_SECONDS=0: websocket.idle_timeout_seconds: "
            "Input should be greater than 0",
        ),
        (
            "websocket: {max_sessions_per_upstrem: 5}\n",
            "true",
            {},
            "websocket.max_sessions_per_upstrem: unknown field, did you mean "
            "max_sessions_per_upstream?",
        ),
        ("", "maybe", {}, "routes.0.websocket: Input should be a valid boolean"),
    ],
    ids=["size", "idle-env", "typo", "route"],
)
def test_websocket_config_errors_name_the_field(
    section: str,
    route_value: str,
    env: dict[str, str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from service.config import ConfigError, load_settings

    path = tmp_path / "relay.yaml"
    path.write_text(
        section + "upstreams: {up: {url: 'http://127.0.0.1:9'}}\n"
        f"routes: [{{prefix: /, upstream: up, websocket: {route_value}}}]\n"
    )
    for name, setting in env.items():
        monkeypatch.setenv(name, setting)
    with pytest.raises(ConfigError) as error:
        load_settings(path)
    assert message in str(error.value)


async def test_a_session_goes_to_an_endpoint_of_an_upstream_of_many(no_error_logs: None) -> None:
    """The url's host is a name nothing resolves: the session can only have reached the
    upstream through the endpoint chosen for it, the handshake still naming the url."""
    async with ws_upstream() as up:
        settings = one_upstream("http://ws.example:1", endpoints=[up.url])
        async with run_relay(settings) as relay:
            async with client(relay.url.replace("http://", "ws://") + "/x") as ws:
                await ws.send("via an endpoint")
                assert await ws.recv() == "via an endpoint"
            (request,) = up.handshakes
            assert request.headers["host"] == "ws.example:1"
            await sessions_closed(relay)


async def test_an_upstream_with_no_healthy_endpoint_refuses_the_handshake_503() -> None:
    settings = one_upstream(
        "http://ws.example:1",
        endpoints=[f"http://127.0.0.1:{closed_port()}"],
        outlier={"consecutive_failures": 1, "max_ejection_percent": 100},
    )
    async with run_relay(settings) as relay:
        assert (
            await raw_exchange(relay.url, head("GET /x HTTP/1.1", "Host: t", "Connection: close"))
        ).startswith(b"HTTP/1.1 502")  # the connect failure that ejects the only endpoint
        with pytest.raises(InvalidStatus) as refused:
            async with client(relay.url.replace("http://", "ws://") + "/x"):
                pass
        response = refused.value.response
        assert response.status_code == 503
        assert "error=destination_unavailable" in response.headers["proxy-status"]


async def test_the_routes_header_policies_apply_to_the_handshake(no_error_logs: None) -> None:
    route = {
        "request_headers": {"set": {"X-Env": "prod"}, "remove": ["X-Debug"]},
        "response_headers": {"set": {"X-Frame-Options": "DENY"}},
    }
    async with (
        proxied(route=route) as (up, _relay, base),
        client(base + "/x", additional_headers={"X-Debug": "1", "X-Env": "dev"}) as ws,
    ):
        await ws.send("policies")
        assert await ws.recv() == "policies"
        assert ws.response is not None
        assert ws.response.headers["x-frame-options"] == "DENY"
    (request,) = up.handshakes
    assert request.headers.get_all("x-env") == ["prod"]
    assert "x-debug" not in request.headers
