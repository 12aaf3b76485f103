"""Per-route policies over real sockets: a route's timeouts replace its upstream's, its total
timeout bounds the whole exchange (504 before the response headers, a cut response after),
and its header policies set and remove fields both ways; bad policies are refused at load."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.trace import SpanKind, StatusCode
from pydantic import ValidationError

from service.config import ConfigError, RouteConfig, load_settings
from service.config_routes import RESERVED_HEADERS, HeaderPolicy
from service.headers import RequestContext, downstream_response_headers, upstream_request_headers
from service.route_policy import HeaderEdits, RoutePolicies, RoutePolicy
from service.telemetry.tracing import Instrumentation
from tests.support.http import http_client
from tests.support.logs import Records
from tests.support.metrics import exposition_async, samples, value
from tests.support.net import closed_port, eventually
from tests.support.recording import RecordingUpstream
from tests.support.relays import pool_settled, run_relay
from tests.support.scripted import (
    ScriptedUpstream,
    delayed,
    endless_stream,
    hang,
    respond,
    send_raw,
)
from tests.support.tracing import in_memory
from tests.support.wire import connect, parse_response_head

pytestmark = pytest.mark.usefixtures("no_error_logs")

PROMPT = 5  # answered by the proxy, far below the client's own 10 s timeout


def policy_config(
    url: str, routes: list[dict[str, Any]], transport: str = "aiohttp", **upstream: Any
) -> dict[str, Any]:
    """One upstream ``up`` (slow timeouts unless given) behind ``routes``."""
    upstream.setdefault("timeouts", {"read": 5})
    return {
        "upstreams": {"up": {"url": url, "transport": transport, **upstream}},
        "routes": [{"upstream": "up", **route} for route in routes],
    }


def total_timeouts(metrics: str) -> float:
    return value(samples(metrics), "relay_upstream_errors_total", reason="total_timeout")


async def timed_get(client: httpx.AsyncClient, url: str) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = await client.get(url)
    return response, time.monotonic() - started


def assert_proxy_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["proxy-status"] == f'relay; error={error}; next-hop="up"'


# Timeouts


async def test_a_routes_read_timeout_replaces_its_upstreams(transport: str) -> None:
    """The same slow upstream: 504 through the route with a short read timeout, 200 through
    the route that keeps the upstream's."""
    upstream = ScriptedUpstream({"/slow": delayed(0.4, respond(200, b"late"))})
    routes = [
        {"prefix": "/strict", "strip_prefix": True, "timeouts": {"read": 0.1}},
        {"prefix": "/"},
    ]
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes, transport)) as relay,
        http_client(timeout=10) as client,
    ):
        strict, elapsed = await timed_get(client, f"{relay.url}/strict/slow")
        relaxed = await client.get(f"{relay.url}/slow")
        await eventually(lambda: pool_settled(relay))
    assert_proxy_error(strict, 504, "connection_read_timeout")
    assert 0.05 < elapsed < PROMPT
    assert (relaxed.status_code, relaxed.content) == (200, b"late")


async def test_a_routes_pool_timeout_replaces_its_upstreams() -> None:
    """One connection, held: the route with a short pool timeout gets its 503 at once while
    the upstream's own (5 s) would still be waiting."""
    upstream = ScriptedUpstream({"/held": hang, "/x": respond(200, b"ok")})
    routes = [
        {"prefix": "/quick", "strip_prefix": True, "timeouts": {"pool": 0.1}},
        {"prefix": "/"},
    ]
    pool, slow = {"max_connections": 1}, {"read": 5, "pool": 5}
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes, pool=pool, timeouts=slow)) as relay,
        http_client(timeout=10) as client,
    ):
        holder = asyncio.create_task(client.get(f"{relay.url}/held"))
        await eventually(lambda: relay.relay.upstreams()["up"].snapshot().in_use == 1)
        refused, elapsed = await timed_get(client, f"{relay.url}/quick/x")
        holder.cancel()
        await asyncio.gather(holder, return_exceptions=True)
        await eventually(lambda: pool_settled(relay))
    assert_proxy_error(refused, 503, "connection_limit_reached")
    assert elapsed < 4  # far below the upstream's own 5 s


async def test_total_timeout_before_the_headers_is_504(transport: str, access: Records) -> None:
    """An upstream slower than the route's total (but within every other timeout): 504 with
    Proxy-Status http_response_timeout, counted and logged as total_timeout; a quick answer
    on the same route is untouched."""
    upstream = ScriptedUpstream({"/slow": hang, "/quick": respond(200, b"ok")})
    routes = [{"prefix": "/", "timeouts": {"total": 0.3}}]
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes, transport)) as relay,
        http_client(timeout=10) as client,
    ):
        quick = await client.get(f"{relay.url}/quick")
        slow, elapsed = await timed_get(client, f"{relay.url}/slow")
        await eventually(lambda: pool_settled(relay))
        metrics = await exposition_async(relay.admin_url)
        # The cancelled exchange's connection was closed, never handed to another request.
        await eventually(lambda: upstream.closed_connections >= 1)
    assert (quick.status_code, quick.content) == (200, b"ok")
    assert_proxy_error(slow, 504, "http_response_timeout")
    assert 0.25 < elapsed < PROMPT
    assert total_timeouts(metrics) == 1
    line = access()[-1].__dict__
    assert (line["path"], line["status"], line["outcome"]) == ("/slow", 504, "total_timeout")


async def test_total_timeout_cuts_a_slow_stream(transport: str, access: Records) -> None:
    """A stream whose every chunk comes within the read timeout but which outlasts the
    route's total: the client gets the head and part of the body, then the connection drops
    (never a complete-looking response); counted and logged, the upstream connection closed
    and the pool back to idle."""
    upstream = ScriptedUpstream({"/stream": endless_stream})
    routes = [{"prefix": "/", "timeouts": {"total": 0.4}}]
    received = 0
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes, transport)) as relay,
        http_client(timeout=10) as client,
    ):
        started = time.monotonic()
        async with client.stream("GET", f"{relay.url}/stream") as response:
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                async for chunk in response.aiter_raw():
                    received += len(chunk)
        elapsed = time.monotonic() - started
        await eventually(lambda: pool_settled(relay))
        await eventually(lambda: upstream.closed_connections == 1)
        metrics = await exposition_async(relay.admin_url)
    assert 0.35 < elapsed < PROMPT
    assert received > 0
    assert total_timeouts(metrics) == 1
    assert value(samples(metrics), "relay_responses_truncated_total", upstream="up") == 1
    line = access()[-1].__dict__
    assert (line["status"], line["outcome"], line["reason"]) == (
        200,
        "total_timeout",
        "total_timeout",
    )
    assert line["response_bytes"] > 0


async def test_total_timeout_during_a_slow_upload_is_504(transport: str, access: Records) -> None:
    """The bound covers sending the request body too: a client whose upload stalls past the
    route's total gets its 504 while still connected, and the upstream connection is freed."""
    upstream = ScriptedUpstream({"/upload": respond(200, b"got it")})
    routes = [{"prefix": "/", "timeouts": {"total": 0.3}}]
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes, transport)) as relay,
    ):
        reader, writer = await connect(relay.url)
        try:
            started = time.monotonic()
            writer.write(
                b"POST /upload HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\n\r\n"
                + b"64\r\n"
                + b"x" * 100
                + b"\r\n"
            )
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPT)
            elapsed = time.monotonic() - started
        finally:
            writer.close()
        await eventually(lambda: pool_settled(relay))
    status, headers = parse_response_head(head)
    assert status == 504
    assert headers["proxy-status"] == 'relay; error=http_response_timeout; next-hop="up"'
    assert 0.25 < elapsed < PROMPT
    assert access()[-1].__dict__["outcome"] == "total_timeout"
    assert upstream.seen == []  # the body never ended: the upstream never had a whole request


@pytest.mark.parametrize("mode", ["stock", "native"])
async def test_a_total_timeout_is_on_the_server_span(mode: Instrumentation) -> None:
    upstream = ScriptedUpstream({"/hang": hang})
    tracing, exporter = in_memory(mode)
    routes = [{"prefix": "/", "timeouts": {"total": 0.2}}]
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes), tracing=tracing) as relay,
        http_client(timeout=10) as client,
    ):
        assert (await client.get(f"{relay.url}/hang")).status_code == 504
        await eventually(
            lambda: any(s.kind is SpanKind.SERVER for s in exporter.get_finished_spans())
        )
    (server,) = [s for s in exporter.get_finished_spans() if s.kind is SpanKind.SERVER]
    assert server.attributes is not None
    assert server.attributes["relay.reason"] == "total_timeout"
    assert server.status.status_code is StatusCode.ERROR


# Header policies


async def test_request_header_policy_sets_and_removes_what_goes_upstream() -> None:
    """Names match case-insensitively; set replaces every field of its name, remove drops
    every one; a route without a policy forwards them all."""
    routes = [
        {
            "prefix": "/api",
            "request_headers": {"set": {"X-Env": "prod"}, "remove": ["X-DEBUG"]},
        },
        {"prefix": "/"},
    ]
    sent = [
        ("X-Env", "dev"),
        ("x-env", "stage"),
        ("x-debug", "1"),
        ("X-Debug", "2"),
        ("X-Keep", "k"),
    ]
    async with (
        RecordingUpstream().running() as upstream,
        run_relay(policy_config(upstream.url, routes)) as relay,
        http_client(timeout=10) as client,
    ):
        for path in ("/api/a", "/other"):
            response = await client.get(f"{relay.url}{path}", headers=sent)
            assert response.status_code == 200
    with_policy, without = upstream.requests
    assert with_policy.header(b"x-env") == [b"prod"]
    assert with_policy.header(b"x-debug") == []
    assert with_policy.header(b"x-keep") == [b"k"]
    assert with_policy.header(b"host") and with_policy.header(b"x-forwarded-for")
    assert without.header(b"x-env") == [b"dev", b"stage"]
    assert without.header(b"x-debug") == [b"1", b"2"]


UPSTREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nServer: upstream/1.0\r\n"
    b"x-powered-by: a\r\nX-Powered-By: b\r\nStrict-Transport-Security: max-age=1\r\n"
    b"strict-transport-security: max-age=2\r\nX-Keep: k\r\n\r\nok"
)
HSTS = "max-age=63072000; includeSubDomains"


async def test_response_header_policy_sets_and_removes_what_goes_to_the_client() -> None:
    routes = [
        {
            "prefix": "/web",
            "response_headers": {
                "set": {"strict-transport-security": HSTS},
                "remove": ["server", "X-POWERED-BY"],
            },
        },
        {"prefix": "/"},
    ]
    upstream = ScriptedUpstream({"/web": send_raw(UPSTREAM_HEAD, close=False)})
    upstream.handlers["/"] = upstream.handlers["/web"]
    async with (
        upstream.running(),
        run_relay(policy_config(upstream.url, routes)) as relay,
        http_client(timeout=10) as client,
    ):
        edited = await client.get(f"{relay.url}/web")
        untouched = await client.get(f"{relay.url}/")
    assert (edited.status_code, edited.content) == (200, b"ok")
    assert edited.headers.get_list("strict-transport-security") == [HSTS]
    assert "server" not in edited.headers and "x-powered-by" not in edited.headers
    assert edited.headers["x-keep"] == "k" and "via" in edited.headers
    assert untouched.headers.get_list("strict-transport-security") == ["max-age=1", "max-age=2"]
    assert untouched.headers.get_list("x-powered-by") == ["a", "b"]
    assert untouched.headers["server"] == "upstream/1.0"


async def test_the_proxys_own_answers_on_a_route_get_its_response_policy() -> None:
    """As Envoy's local replies get response_headers_to_add: a 502 for an upstream that
    refuses connections carries the route's fields too; an unrouted 404 has no route."""
    routes = [
        {
            "prefix": "/api",
            "response_headers": {
                "set": {"Strict-Transport-Security": HSTS},
                "remove": ["Cache-Control"],
            },
        }
    ]
    config = policy_config(f"http://127.0.0.1:{closed_port()}", routes)
    async with run_relay(config) as relay, http_client(timeout=10) as client:
        failed = await client.get(f"{relay.url}/api")
        unrouted = await client.get(f"{relay.url}/nothing")
    assert_proxy_error(failed, 502, "connection_refused")
    assert failed.headers.get_list("strict-transport-security") == [HSTS]
    assert "cache-control" not in failed.headers
    assert unrouted.status_code == 404
    assert "strict-transport-security" not in unrouted.headers


# Config: refused at load, one line naming the field


def load(tmp_path: Path, route: dict[str, Any], **top: Any) -> Any:
    config = {
        "upstreams": {"api": {"url": "http://127.0.0.1:9"}},
        "routes": [{"prefix": "/", "upstream": "api", **route}],
        **top,
    }
    path = tmp_path / "relay.yaml"
    path.write_text(yaml.safe_dump(config))
    return load_settings(path)


@pytest.mark.parametrize(
    ("route", "message"),
    [
        (
            {"request_headers": {"set": {"Host": "x"}}},
            "routes.0.request_headers.set: 'Host' cannot be set by a header policy: "
            "the proxy writes Host and the message framing itself",
        ),
        (
            {"request_headers": {"set": {"transfer-encoding": "chunked"}}},
            "routes.0.request_headers.set: 'transfer-encoding' cannot be set",
        ),
        (
            {"response_headers": {"set": {"Content-Length": "1"}}},
            "routes.0.response_headers.set: 'Content-Length' cannot be set",
        ),
        (
            {"request_headers": {"set": {"X-Forwarded-For": "1.2.3.4"}}},
            "routes.0.request_headers.set: 'X-Forwarded-For' cannot be set by a header "
            "policy: a forwarding field, kept or dropped by server.trusted_proxies only",
        ),
        (
            {"request_headers": {"set": {"X-Forwarded-Ssl": "on"}}},
            "routes.0.request_headers.set: 'X-Forwarded-Ssl' cannot be set",
        ),
        (
            {"request_headers": {"remove": ["Forwarded"]}},
            "routes.0.request_headers.remove: 'Forwarded' cannot be removed",
        ),
        (
            {"response_headers": {"remove": ["Via"]}},
            "routes.0.response_headers.remove: 'Via' cannot be removed",
        ),
        (
            {"request_headers": {"remove": ["Keep-Alive"]}},
            "routes.0.request_headers.remove: 'Keep-Alive' cannot be removed by a header "
            "policy: a hop-by-hop field, never forwarded",
        ),
        (
            {"response_headers": {"set": {"proxy-status": "x"}}},
            "routes.0.response_headers.set: 'proxy-status' cannot be set",
        ),
        (
            {"response_headers": {"set": {"x-request-id": "x"}}},
            "routes.0.response_headers.set: 'x-request-id' cannot be set by a header policy: "
            "it is the request id field (request_id.header)",
        ),
        (
            {"request_headers": {"set": {"X-A": "a\r\nX-Injected: 1"}}},
            "routes.0.request_headers.set: 'X-A': a value holds visible ASCII, spaces and "
            "tabs only (no CR, LF, NUL or other controls)",
        ),
        ({"request_headers": {"set": {"X-A": "a\x00"}}}, "routes.0.request_headers.set: 'X-A'"),
        ({"request_headers": {"set": {"X-A": "café"}}}, "routes.0.request_headers.set: 'X-A'"),
        (
            {"response_headers": {"set": {"X-A": "a "}}},
            "routes.0.response_headers.set: 'X-A': a value must not start or end with a space",
        ),
        (
            {"response_headers": {"set": {"X-A": 5}}},
            "routes.0.response_headers.set.X-A: Input should be a valid string",
        ),
        (
            {"response_headers": {"set": {"Bad Name": "x"}}},
            "routes.0.response_headers.set: 'Bad Name' is not a valid header field name",
        ),
        (
            {"response_headers": {"set": {"X-A": "1", "x-a": "2"}}},
            "routes.0.response_headers.set: 'x-a' and 'X-A' are the same field",
        ),
        (
            {"response_headers": {"set": {"X-A": "1"}, "remove": ["X-a"]}},
            "routes.0.response_headers: 'x-a' is both set and removed",
        ),
        ({"response_headers": {"add": {"X-A": "1"}}}, "routes.0.response_headers.add: unknown"),
        ({"timeouts": {"total": 0}}, "routes.0.timeouts.total: Input should be greater than 0"),
        ({"timeouts": {"read": "soon"}}, "routes.0.timeouts.read: Input should be a valid number"),
        ({"timeouts": {"idle": 1}}, "routes.0.timeouts.idle: unknown field"),
    ],
)
def test_bad_policies_are_refused_in_one_line_naming_the_field(
    tmp_path: Path, route: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, route)
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(f"invalid config: {message}"), text


@pytest.mark.parametrize("name", [*sorted(RESERVED_HEADERS), "X-Forwarded-Anything"])
def test_every_field_the_proxy_owns_is_refused_both_ways(name: str) -> None:
    """The one list (config_routes.RESERVED_HEADERS, which tests/test_request_ids.py checks against
    every name service.headers handles), in any case, for set and for remove."""
    with pytest.raises(ValidationError, match="cannot be set by a header policy"):
        HeaderPolicy.model_validate({"set": {name.upper(): "x"}})
    with pytest.raises(ValidationError, match="cannot be removed by a header policy"):
        HeaderPolicy.model_validate({"remove": [name]})


def test_the_configured_request_id_field_is_the_one_refused(tmp_path: Path) -> None:
    policy = {"request_headers": {"remove": ["X-Trace-Id"]}}
    with pytest.raises(ConfigError, match=r"routes\.0\.request_headers\.remove: 'X-Trace-Id'"):
        load(tmp_path, policy, request_id={"header": "x-trace-id"})
    assert load(
        tmp_path,
        {"request_headers": {"remove": ["X-Request-Id"]}},
        request_id={"header": "x-trace-id"},
    )


def test_policies_compile_once_and_routes_without_them_have_none(tmp_path: Path) -> None:
    settings = load(tmp_path, {"timeouts": {"read": 2, "connect": None}})
    route = settings.routes[0]
    policy = RoutePolicy.of(route, settings.upstreams["api"])
    assert policy is not None and policy.total is None
    # The upstream's (defaults) with the route's two: null disables one for this route.
    assert policy.timeouts == {"connect": None, "read": 2.0, "write": 30.0, "pool": 5.0}
    bare = RouteConfig(prefix="/", upstream="api")
    assert RoutePolicy.of(bare, settings.upstreams["api"]) is None
    only_total = RouteConfig(prefix="/", upstream="api", timeouts={"total": 3})  # type: ignore[arg-type]
    compiled = RoutePolicy.of(only_total, settings.upstreams["api"])
    assert compiled is not None and (compiled.timeouts, compiled.total) == (None, 3.0)
    empty = RouteConfig(prefix="/", upstream="api", request_headers={})  # type: ignore[arg-type]
    assert RoutePolicy.of(empty, settings.upstreams["api"]) is None
    assert RoutePolicies([bare], settings.upstreams).get(bare) is None


def test_header_edits_leave_the_proxys_own_fields_alone() -> None:
    """Unit check of the compiled edits on both header builders."""
    edits = HeaderEdits.of(
        HeaderPolicy.model_validate({"set": {"X-Env": "prod"}, "remove": ["X-Debug"]})
    )
    assert edits is not None
    ctx = RequestContext(peer="10.0.0.1", scheme="http", http_version="1.1", host=b"a")
    raw = [(b"X-Env", b"dev"), (b"X-DEBUG", b"1"), (b"accept", b"*/*")]
    out = upstream_request_headers(
        raw,
        ctx,
        upstream_authority=b"up",
        preserve_host=False,
        via_name=b"relay",
        trusted=[],
        edits=edits,
    )
    names = [n for n, _ in out]
    assert (b"x-env", b"prod") in out and b"x-debug" not in names and names.count(b"x-env") == 1
    assert {b"host", b"via", b"x-forwarded-for", b"accept"} <= set(names)
    down = downstream_response_headers(raw, http_version="1.1", via_name=b"relay", edits=edits)
    assert [n for n, _ in down] == [b"accept", b"via", b"x-env"]
