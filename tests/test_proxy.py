"""Forwarding over real sockets, both transports: methods, byte-exact targets, routing,
Host handling, and paths that only the upstream answers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from tests.support.http import http_client
from tests.support.relays import RunningRelay, one_upstream, run_relay
from tests.support.scripted import Request, ScriptedUpstream, Writer, echo, respond
from tests.support.wire import connect, raw_exchange

pytestmark = pytest.mark.usefixtures("no_error_logs")

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


async def method_echo(request: Request, writer: Writer) -> None:
    body = f"{request.method} {request.path} ".encode() + request.body
    await respond(200, body, {"x-upstream": "a"})(request, writer)


@pytest.fixture
async def proxied(transport: str) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    upstream = ScriptedUpstream({"/echo": echo})
    other = ScriptedUpstream({"/": respond(200, b"other")})
    async with upstream.running(), other.running():
        for path in ("/m", "/metrics", "/healthz", "/readyz", "/users", "/base/users", "/"):
            upstream.handlers[path] = method_echo
        for path in ("/a%2Fb/c%20d", "/base/x%2Fy", "/x%2Fy", "/caf%C3%A9/v1"):
            upstream.handlers[path] = method_echo
        for path in ("//double//slash/.hidden/..dots../x.y", "/~user/%7Euser/a;p=1,2/@:$&'()*+=!"):
            upstream.handlers[path] = method_echo
        config = {
            "upstreams": {
                "a": {"url": upstream.url, "transport": transport},
                "based": {"url": f"{upstream.url}/base", "transport": transport},
                "host": {"url": upstream.url, "transport": transport, "preserve_host": True},
                "b": {"url": other.url, "transport": transport},
            },
            "routes": [
                {"prefix": "/api", "upstream": "based", "strip_prefix": True},
                {"prefix": "/v1/", "upstream": "a", "strip_prefix": True},
                {"prefix": "/café", "upstream": "a", "strip_prefix": True},
                {"prefix": "/preserve", "upstream": "host", "strip_prefix": True},
                {"prefix": "/", "upstream": "b", "host": "other.example"},
                {"prefix": "/", "upstream": "b", "host": "*.wild.example"},
                {"prefix": "/", "upstream": "a"},
            ],
            # Some targets below carry %2F, which is refused by default.
            "limits": {"allow_encoded_slashes": True},
        }
        async with run_relay(config) as running:
            yield running, upstream


@pytest.mark.parametrize("method", METHODS)
async def test_every_method(proxied: tuple[RunningRelay, ScriptedUpstream], method: str) -> None:
    running, upstream = proxied
    body = b"payload" if method in ("POST", "PUT", "PATCH", "DELETE") else None
    async with http_client() as client:
        response = await client.request(method, f"{running.url}/m?q=1", content=body)
    assert response.status_code == 200
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.body) == (method, "/m?q=1", body or b"")
    if method == "HEAD":
        assert response.content == b""
        assert response.headers["content-length"] == str(len(b"HEAD /m?q=1 "))
    else:
        assert response.content == f"{method} /m?q=1 ".encode() + (body or b"")
    assert response.headers["x-upstream"] == "a"
    assert response.headers["via"] == "1.1 relay"


@pytest.mark.parametrize(
    "target",
    [
        "/a%2Fb/c%20d?x=1&y=%2F",
        "/a%2Fb/c%20d?z=%C3%A9&empty=&flag&a=1&a=2",
        "/m?q=a+b&r=%2B",
        "/m",
        "//double//slash/.hidden/..dots../x.y?x=%00&/../",
        "/~user/%7Euser/a;p=1,2/@:$&'()*+=!",
    ],
)
async def test_target_reaches_the_upstream_byte_exact(
    proxied: tuple[RunningRelay, ScriptedUpstream], target: str
) -> None:
    running, upstream = proxied
    raw = await raw_exchange(
        running.url, f"GET {target} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw
    assert upstream.seen[-1].path == target


@pytest.mark.parametrize(
    "target", ["/m/../admin", "/api/..", "/v1/./users", "/m/%2e%2e/admin", "/m/.%2E/x?y=1", "/."]
)
async def test_dot_segments_are_refused(
    proxied: tuple[RunningRelay, ScriptedUpstream], target: str
) -> None:
    """Routing sees "/m/../admin" (the catch-all, or /api), but the upstream client would
    send "/admin" (or climb out of /base): refused rather than forwarded elsewhere."""
    running, upstream = proxied
    raw = await raw_exchange(
        running.url, f"GET {target} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 400"), raw
    assert b"proxy-status: relay; error=http_request_error\r\n" in raw
    assert upstream.seen == []


async def test_host_is_rewritten_unless_preserved(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    async with http_client() as client:
        await client.get(f"{running.url}/m", headers={"host": "edge.example"})
        assert upstream.seen[-1].headers["host"] == f"127.0.0.1:{upstream.port}"
        assert upstream.seen[-1].headers["x-forwarded-host"] == "edge.example"
        await client.get(f"{running.url}/preserve/m", headers={"host": "edge.example:8443"})
        assert upstream.seen[-1].path == "/m"
        assert upstream.seen[-1].headers["host"] == "edge.example:8443"


@pytest.mark.parametrize(
    ("target", "upstream_path"),
    [
        ("/api/users", "/base/users"),  # strip, then the upstream's base path
        ("/api/x%2Fy?q=%2F", "/base/x%2Fy?q=%2F"),
        ("/api", "/base/"),
        ("/v1/users", "/users"),  # the prefix's trailing slash is a segment boundary
        ("/v1", "/"),
        ("/%761/users", "/users"),  # the client percent-encoded part of the prefix
        ("/caf%C3%A9/caf%C3%A9/v1", "/caf%C3%A9/v1"),  # a non-ASCII prefix, sent encoded
        ("/apix", "/apix"),  # not on a segment boundary: the catch-all, unchanged
    ],
)
async def test_strip_prefix(
    proxied: tuple[RunningRelay, ScriptedUpstream], target: str, upstream_path: str
) -> None:
    running, upstream = proxied
    upstream.handlers.setdefault(upstream_path.split("?")[0], method_echo)
    raw = await raw_exchange(
        running.url, f"GET {target} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 200"), raw
    assert upstream.seen[-1].path == upstream_path


async def test_host_routes(proxied: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = proxied
    async with http_client() as client:
        for host in ("other.example", "OTHER.example:8080", "a.wild.example"):
            response = await client.get(f"{running.url}/", headers={"host": host})
            assert response.content == b"other", host
        for host in ("elsewhere", "wild.example"):
            response = await client.get(f"{running.url}/m", headers={"host": host})
            assert response.content == b"GET /m ", host
    assert [r.path for r in upstream.seen] == ["/m", "/m"]


async def test_no_route_is_a_404_with_proxy_status() -> None:
    upstream = ScriptedUpstream({"/only": respond(200, b"ok")})
    async with upstream.running():
        config = {
            "upstreams": {"a": {"url": upstream.url}},
            "routes": [{"prefix": "/only", "upstream": "a"}],
        }
        async with run_relay(config) as running, http_client() as client:
            response = await client.get(f"{running.url}/other")
            assert (await client.get(f"{running.url}/only/x")).status_code == 404
            assert (await client.get(f"{running.url}/only")).content == b"ok"
    assert response.status_code == 404
    assert response.headers["proxy-status"] == "relay; error=destination_not_found"
    assert [r.path for r in upstream.seen] == ["/only/x", "/only"]


async def test_admin_paths_on_the_proxy_port_are_proxied(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    async with http_client() as client:
        for path in ("/metrics", "/healthz", "/readyz"):
            response = await client.get(f"{running.url}{path}")
            assert response.content == f"GET {path} ".encode()
            assert response.headers["x-upstream"] == "a"
        # ... while the admin listener answers them itself.
        assert (await client.get(f"{running.admin_url}/healthz")).status_code == 200
        assert (await client.get(f"{running.admin_url}/readyz")).text == "ready\n"
        assert "relay_requests_total" in (await client.get(f"{running.admin_url}/metrics")).text
    assert [r.path for r in upstream.seen] == ["/metrics", "/healthz", "/readyz"]


async def test_expect_100_continue_to_an_upstream_that_ignores_it(transport: str) -> None:
    """The client gets its 100 from the proxy; the upstream (which never sends one) gets the
    body anyway instead of the exchange hanging."""
    upstream = ScriptedUpstream({"/echo": echo})
    async with upstream.running(), run_relay(one_upstream(upstream.url, transport)) as relay:
        reader, writer = await connect(relay.url)
        try:
            writer.write(
                b"POST /echo HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\n"
                b"expect: 100-continue\r\nconnection: close\r\n\r\n"
            )
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"hello")
            await writer.drain()
            response = await asyncio.wait_for(reader.read(), 5)
        finally:
            writer.close()
    assert response.startswith(b"HTTP/1.1 200")
    assert response.endswith(b"\r\n\r\nhello")
    assert upstream.seen[-1].headers["expect"] == "100-continue"
    assert upstream.seen[-1].body == b"hello"


async def test_upstream_connections_are_pooled(transport: str) -> None:
    upstream = ScriptedUpstream({"/echo": echo})
    async with upstream.running(), run_relay(one_upstream(upstream.url, transport)) as relay:
        for index in range(5):
            # A new client connection each time: only the upstream side is kept alive.
            async with http_client() as client:
                response = await client.post(f"{relay.url}/echo", content=b"%d" % index)
                assert response.content == b"%d" % index
        assert relay.relay.upstreams()["up"].snapshot().idle == 1
    assert len(upstream.seen) == 5
    assert upstream.closed_connections == 1  # one connection served all five


async def test_idle_keepalive_client_connections_close_after_the_configured_timeout() -> None:
    """``server.keepalive_timeout_seconds``: an idle client connection is closed by Relay
    once it has been idle that long, not before (uvicorn's own default is 5 s)."""
    from service.config import ServerConfig

    assert ServerConfig().keepalive_timeout_seconds == 75  # above an ALB's 60 s
    upstream = ScriptedUpstream({"/": respond(200, b"ok")})
    async with upstream.running():
        config = one_upstream(upstream.url)
        config["server"] = {"keepalive_timeout_seconds": 1.5}
        async with run_relay(config) as relay:
            reader, writer = await connect(relay.url)
            try:
                writer.write(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                await writer.drain()
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                assert head.startswith(b"HTTP/1.1 200")
                assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
                idle_since = asyncio.get_running_loop().time()
                assert await asyncio.wait_for(reader.read(), 20) == b""  # closed by Relay
                idle = asyncio.get_running_loop().time() - idle_since
                assert idle >= 1.4, idle
            finally:
                writer.close()
