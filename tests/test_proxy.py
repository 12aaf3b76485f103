"""Forwarding over real sockets: methods, paths, routing and headers in both directions."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.harness import (
    Request,
    RunningRelay,
    ScriptedUpstream,
    Writer,
    echo,
    raw_exchange,
    respond,
    run_relay,
)

GZIPPED = gzip.compress(b"hello " * 100)


async def method_echo(request: Request, writer: Writer) -> None:
    body = f"{request.method} {request.path} ".encode() + request.body
    await respond(200, body, {"x-upstream": "a"})(request, writer)


async def connection_headers(request: Request, writer: Writer) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-bar\r\nx-bar: 1\r\n"
        b"keep-alive: timeout=5\r\nx-kept: yes\r\nvia: 1.0 origin\r\n\r\nok"
    )
    await writer.drain()


def set_cookie_once() -> Any:
    async def handler(request: Request, writer: Writer) -> None:
        await respond(200, b"ok", {"set-cookie": "session=secret; Path=/"})(request, writer)

    return handler


@pytest.fixture
async def proxied(transport: str) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    handlers = {
        "/echo": echo,
        "/gzip": respond(200, GZIPPED, {"content-encoding": "gzip"}),
        "/conn": connection_headers,
        "/cookie": set_cookie_once(),
    }
    upstream = ScriptedUpstream(handlers)
    other = ScriptedUpstream({})
    async with upstream.running(), other.running():
        for path in ("/m", "/metrics", "/healthz", "/base/users", "/a%2Fb/c%20d"):
            upstream.handlers[path] = method_echo
        other.handlers["/"] = respond(200, b"other")
        config = {
            "upstreams": {
                "a": {"url": upstream.url, "transport": transport},
                "based": {"url": f"{upstream.url}/base", "transport": transport},
                "host": {"url": upstream.url, "transport": transport, "preserve_host": True},
                "b": {"url": other.url, "transport": transport},
            },
            "routes": [
                {"prefix": "/api", "upstream": "based", "strip_prefix": True},
                {"prefix": "/preserve", "upstream": "host", "strip_prefix": True},
                {"prefix": "/", "upstream": "b", "host": "other.example"},
                {"prefix": "/", "upstream": "a"},
            ],
        }
        async with run_relay(config) as running:
            yield running, upstream


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
async def test_every_method(proxied: tuple[RunningRelay, ScriptedUpstream], method: str) -> None:
    running, upstream = proxied
    body = b"payload" if method in ("POST", "PUT", "PATCH", "DELETE") else None
    async with httpx.AsyncClient() as client:
        response = await client.request(method, f"{running.url}/m?q=1", content=body)
    assert response.status_code == 200
    seen = upstream.seen[-1]
    assert (seen.method, seen.path, seen.body) == (method, "/m?q=1", body or b"")
    if method == "HEAD":
        assert response.content == b""
    else:
        assert response.content == f"{method} /m?q=1 ".encode() + (body or b"")
    assert response.headers["x-upstream"] == "a"


async def test_query_and_encoded_path_are_byte_exact(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    target = "/a%2Fb/c%20d?x=1&y=%2F&z=%C3%A9&empty="
    raw = await raw_exchange(
        running.url, f"GET {target} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".encode()
    )
    assert raw.startswith(b"HTTP/1.1 200")
    assert upstream.seen[-1].path == target


async def test_host_rewrite_strip_prefix_and_preserve_host(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    async with httpx.AsyncClient() as client:
        await client.get(f"{running.url}/m", headers={"host": "edge.example"})
        assert upstream.seen[-1].headers["host"] == f"127.0.0.1:{upstream.port}"
        assert upstream.seen[-1].headers["x-forwarded-host"] == "edge.example"
        await client.get(f"{running.url}/api/users")
        assert upstream.seen[-1].path == "/base/users"
        await client.get(f"{running.url}/preserve/m", headers={"host": "edge.example"})
        assert upstream.seen[-1].path == "/m"
        assert upstream.seen[-1].headers["host"] == "edge.example"


async def test_host_routes_and_no_route(proxied: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, _ = proxied
    async with httpx.AsyncClient() as client:
        other = await client.get(f"{running.url}/", headers={"host": "other.example"})
        fallback = await client.get(f"{running.url}/m", headers={"host": "elsewhere"})
    assert other.content == b"other"
    assert fallback.content == b"GET /m "


async def test_no_route_is_a_404_with_proxy_status() -> None:
    upstream = ScriptedUpstream({"/only": respond(200, b"ok")})
    async with upstream.running():
        config = {
            "upstreams": {"a": {"url": upstream.url}},
            "routes": [{"prefix": "/only", "upstream": "a"}],
        }
        async with run_relay(config) as running, httpx.AsyncClient() as client:
            response = await client.get(f"{running.url}/other")
    assert response.status_code == 404
    assert response.headers["proxy-status"] == "relay; error=destination_not_found"
    assert upstream.seen == []


async def test_admin_paths_on_the_proxy_port_are_proxied(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    async with httpx.AsyncClient() as client:
        for path in ("/metrics", "/healthz"):
            response = await client.get(f"{running.url}{path}")
            assert response.content == f"GET {path} ".encode()
    assert [r.path for r in upstream.seen[-2:]] == ["/metrics", "/healthz"]


async def test_hop_by_hop_headers_removed_both_ways(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    request = (
        b"GET /conn HTTP/1.1\r\nhost: t\r\nconnection: close, x-foo\r\nx-foo: 1\r\n"
        b"keep-alive: timeout=1\r\nte: trailers\r\nupgrade: h2c\r\nproxy-authorization: Basic x\r\n"
        b"proxy-connection: keep-alive\r\nx-end-to-end: kept\r\n\r\n"
    )
    raw = await raw_exchange(running.url, request)
    seen = upstream.seen[-1].headers
    for name in ("x-foo", "keep-alive", "te", "upgrade", "proxy-authorization", "proxy-connection"):
        assert name not in seen, name
    assert seen["x-end-to-end"] == "kept"
    assert seen["via"] == "1.1 relay"
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    head = raw.split(b"\r\n\r\n", 1)[0].lower()
    assert b"x-bar" not in head
    assert b"keep-alive" not in head
    assert b"x-kept: yes" in head
    assert b"via: 1.0 origin, 1.1 relay" in head


async def test_forwarded_values_from_untrusted_clients_are_dropped(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    async with httpx.AsyncClient() as client:
        await client.get(
            f"{running.url}/m",
            headers={"x-forwarded-for": "6.6.6.6", "x-forwarded-proto": "https"},
        )
    seen = upstream.seen[-1].headers
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


async def test_no_client_library_default_headers(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, upstream = proxied
    await raw_exchange(running.url, b"GET /m HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    assert set(upstream.seen[-1].headers) == {
        "host",
        "via",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    }


async def test_cookies_are_never_replayed(proxied: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = proxied
    async with httpx.AsyncClient() as first:
        response = await first.get(f"{running.url}/cookie")
        assert response.headers["set-cookie"].startswith("session=secret")
    await raw_exchange(running.url, b"GET /m HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
    assert "cookie" not in upstream.seen[-1].headers


async def test_body_framing(proxied: tuple[RunningRelay, ScriptedUpstream]) -> None:
    running, upstream = proxied

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    async with httpx.AsyncClient() as client:
        await client.get(f"{running.url}/echo")
        get = upstream.seen[-1]
        assert "transfer-encoding" not in get.headers and "content-length" not in get.headers
        await client.post(f"{running.url}/echo", content=b"x" * 5000)
        post = upstream.seen[-1]
        assert post.headers["content-length"] == "5000"
        assert "transfer-encoding" not in post.headers
        assert post.body == b"x" * 5000
        chunked = await client.post(f"{running.url}/echo", content=chunks())
        seen = upstream.seen[-1]
        assert seen.headers["transfer-encoding"] == "chunked"
        assert seen.body == chunked.content == b"one,two,three"


async def test_encoded_response_passes_through_raw(
    proxied: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    running, _ = proxied
    raw = await raw_exchange(
        running.url, b"GET /gzip HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n"
    )
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"content-encoding: gzip" in head.lower()
    assert f"content-length: {len(GZIPPED)}".encode() in head.lower()
    assert body == GZIPPED
