"""Header rewriting (RFC 9110 7.6): the rules as pure functions, then both directions over
real sockets for both transports."""

from __future__ import annotations

import gzip
import ipaddress
from collections.abc import AsyncIterator
from typing import Any

import pytest

from service.headers import (
    RequestContext,
    downstream_response_headers,
    has_body,
    upstream_request_headers,
)
from tests.support.http import http_client
from tests.support.relays import RunningRelay, one_upstream, run_relay
from tests.support.scripted import Request, ScriptedUpstream, Writer, echo, respond, send_raw
from tests.support.wire import raw_exchange

CTX = RequestContext(peer="203.0.113.7", scheme="https", http_version="1.1", host=b"edge.example")
TRUSTED = [ipaddress.ip_network("203.0.113.0/24")]
HOP_BY_HOP = ("connection", "keep-alive", "te", "trailer", "upgrade", "proxy-authorization")
GZIPPED = gzip.compress(b"hello " * 100)
# What a bare request picks up on its way through the proxy, and nothing else.
ADDED_BY_PROXY = {"host", "via", "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"}
ADDED_BY_PROXY |= {"x-request-id"}

Headers = list[tuple[bytes, bytes]]


def names(headers: Headers) -> set[bytes]:
    return {n for n, _ in headers}


def get(headers: Headers, name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    raw = [
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Connection", b"X-Other"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Authenticate", b"Basic"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"X-Secret", b"1"),
        (b"X-Other", b"1"),
        (b"X-Kept", b"2"),
    ]
    out = downstream_response_headers(raw, http_version="1.1", via_name=b"relay", status=200)
    assert names(out) == {b"x-kept", b"via"}
    ctx = RequestContext("192.0.2.1", "http", "1.1", b"edge")
    sent = upstream_request_headers(
        raw, ctx, upstream_authority=b"up", preserve_host=False, via_name=b"relay", trusted=[]
    )
    assert names(sent) == {b"x-kept", b"host", b"via", b"x-forwarded-for", b"x-forwarded-proto"} | {
        b"x-forwarded-host"
    }


def test_request_headers_untrusted_peer_drops_forwarded_values() -> None:
    raw = [
        (b"host", b"edge.example"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"gopher"),
        (b"x-forwarded-host", b"evil"),
        (b"forwarded", b"for=1.2.3.4"),
        (b"accept", b"*/*"),
    ]
    untrusted = RequestContext("198.51.100.1", "http", "1.1", b"edge.example")
    out = upstream_request_headers(
        raw,
        untrusted,
        upstream_authority=b"api:8080",
        preserve_host=False,
        via_name=b"relay",
        trusted=TRUSTED,
    )
    assert get(out, b"host") == [b"api:8080"]
    assert get(out, b"x-forwarded-for") == [b"198.51.100.1"]
    assert get(out, b"x-forwarded-proto") == [b"http"]
    assert get(out, b"x-forwarded-host") == [b"edge.example"]
    assert get(out, b"forwarded") == []
    assert get(out, b"via") == [b"1.1 relay"]
    assert get(out, b"accept") == [b"*/*"]


def test_request_headers_trusted_peer_appends() -> None:
    raw = [
        (b"host", b"edge.example"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-for", b"5.6.7.8"),
        (b"x-forwarded-proto", b"https"),
        (b"x-forwarded-host", b"public.example"),
        (b"via", b"1.1 cdn"),
    ]
    out = upstream_request_headers(
        raw,
        CTX,
        upstream_authority=b"api",
        preserve_host=True,
        via_name=b"relay",
        trusted=TRUSTED,
    )
    assert get(out, b"host") == [b"edge.example"]
    assert get(out, b"x-forwarded-for") == [b"1.2.3.4, 5.6.7.8, 203.0.113.7"]
    assert get(out, b"x-forwarded-proto") == [b"https"]
    assert get(out, b"x-forwarded-host") == [b"public.example"]
    assert get(out, b"via") == [b"1.1 cdn, 1.1 relay"]


def test_response_headers_keep_framing_and_duplicates() -> None:
    raw = [
        (b"Content-Length", b"10"),
        (b"Content-Encoding", b"gzip"),
        (b"Set-Cookie", b"a=1"),
        (b"Set-Cookie", b"b=2"),
        (b"Connection", b"close, X-Hop"),
        (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"),
    ]
    out = downstream_response_headers(raw, http_version="1.1", via_name=b"relay", status=200)
    assert get(out, b"content-length") == [b"10"]
    assert get(out, b"content-encoding") == [b"gzip"]
    assert get(out, b"set-cookie") == [b"a=1", b"b=2"]
    assert b"x-hop" not in names(out) and b"connection" not in names(out)
    assert get(out, b"via") == [b"1.1 relay"]


@pytest.mark.parametrize(
    ("status", "raw"),
    [
        (304, [(b"content-length", b"50")]),
        (204, [(b"content-length", b"5")]),
        (200, [(b"transfer-encoding", b"chunked"), (b"content-length", b"3")]),
    ],
)
def test_response_content_length_dropped_when_it_does_not_frame_the_body(
    status: int, raw: Headers
) -> None:
    out = downstream_response_headers(raw, http_version="1.1", via_name=b"r", status=status)
    assert b"content-length" not in names(out)
    assert b"transfer-encoding" not in names(out)


def test_has_body() -> None:
    assert not has_body([(b"host", b"x")])
    assert not has_body([(b"content-length", b"0")])
    assert has_body([(b"content-length", b"5")])
    assert has_body([(b"transfer-encoding", b"chunked")])


# Over real sockets ------------------------------------------------------------------------


async def hop_by_hop_response(request: Request, writer: Writer) -> None:
    writer.write(
        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: x-bar\r\nx-bar: 1\r\n"
        b"keep-alive: timeout=5\r\ntrailer: x-t\r\nupgrade: h2c\r\nproxy-authenticate: Basic\r\n"
        b"proxy-connection: keep-alive\r\nx-kept: yes\r\nvia: 1.0 origin\r\n\r\nok"
    )
    await writer.drain()


@pytest.fixture
async def wire(transport: str) -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    upstream = ScriptedUpstream(
        {
            "/echo": echo,
            "/hop": hop_by_hop_response,
            "/gzip": respond(200, GZIPPED, {"content-encoding": "gzip"}),
            "/cookie": respond(200, b"ok", {"set-cookie": "session=secret; Path=/"}),
            "/304": send_raw(
                b"HTTP/1.1 304 Not Modified\r\ncontent-length: 50\r\n\r\n", close=False
            ),
            "/te-cl": send_raw(
                b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n"
                b"5\r\nhello\r\n0\r\n\r\n"
            ),
        }
    )
    async with upstream.running(), run_relay(one_upstream(upstream.url, transport)) as relay:
        yield relay, upstream


def request_bytes(path: str, *headers: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "host: edge.example", *headers, "connection: close"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def head_of(raw: bytes) -> bytes:
    return raw.split(b"\r\n\r\n", 1)[0].lower()


@pytest.mark.usefixtures("no_error_logs")
async def test_hop_by_hop_stripped_and_via_added_both_ways(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    relay, upstream = wire
    raw = await raw_exchange(
        relay.url,
        b"GET /hop HTTP/1.1\r\nhost: t\r\nconnection: close, x-foo\r\nx-foo: 1\r\n"
        b"keep-alive: timeout=1\r\nte: trailers\r\ntrailer: x-t\r\nupgrade: h2c\r\n"
        b"proxy-authorization: Basic x\r\nproxy-connection: keep-alive\r\nvia: 1.0 cdn\r\n"
        b"x-end-to-end: kept\r\n\r\n",
    )
    seen = upstream.seen[-1].headers
    for name in (*HOP_BY_HOP, "proxy-connection", "x-foo"):
        assert name not in seen, name
    assert seen["x-end-to-end"] == "kept"
    assert seen["via"] == "1.0 cdn, 1.1 relay"
    head = head_of(raw)
    assert head.startswith(b"http/1.1 200")
    for name in (b"x-bar", b"keep-alive", b"trailer", b"upgrade", b"proxy-authenticate"):
        assert name + b":" not in head, name
    assert b"proxy-connection" not in head
    assert b"x-kept: yes" in head
    assert b"via: 1.0 origin, 1.1 relay" in head


@pytest.mark.usefixtures("no_error_logs")
async def test_forwarded_values_from_untrusted_clients_are_replaced(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    relay, upstream = wire
    await raw_exchange(
        relay.url,
        request_bytes(
            "/echo",
            "x-forwarded-for: 6.6.6.6",
            "x-forwarded-proto: https",
            "x-forwarded-host: evil.example",
        ),
    )
    seen = upstream.seen[-1].headers
    assert seen["x-forwarded-for"] == "127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-host"] == "edge.example"


@pytest.mark.usefixtures("no_error_logs")
async def test_forwarded_values_from_trusted_proxies_are_appended_to(transport: str) -> None:
    upstream = ScriptedUpstream({"/echo": echo})
    async with upstream.running():
        config: dict[str, Any] = {
            **one_upstream(upstream.url, transport),
            "server": {"trusted_proxies": ["127.0.0.0/8"]},
        }
        async with run_relay(config) as relay:
            await raw_exchange(
                relay.url,
                request_bytes(
                    "/echo",
                    "x-forwarded-for: 198.51.100.9",
                    "x-forwarded-proto: https",
                    "x-forwarded-host: public.example",
                ),
            )
    seen = upstream.seen[-1].headers
    assert seen["x-forwarded-for"] == "198.51.100.9, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "https"
    assert seen["x-forwarded-host"] == "public.example"


@pytest.mark.usefixtures("no_error_logs")
async def test_upstream_gets_no_client_library_defaults(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    relay, upstream = wire
    await raw_exchange(relay.url, request_bytes("/echo"))
    assert set(upstream.seen[-1].headers) == ADDED_BY_PROXY
    post = request_bytes("/echo", "content-length: 3", method="POST")
    await raw_exchange(relay.url, post + b"abc")
    assert set(upstream.seen[-1].headers) == ADDED_BY_PROXY | {"content-length"}
    chunked = request_bytes("/echo", "transfer-encoding: chunked", method="PUT")
    await raw_exchange(relay.url, chunked + b"3\r\nabc\r\n0\r\n\r\n")
    assert set(upstream.seen[-1].headers) == ADDED_BY_PROXY | {"transfer-encoding"}
    assert upstream.seen[-1].body == b"abc"


@pytest.mark.usefixtures("no_error_logs")
async def test_cookies_are_never_replayed(wire: tuple[RunningRelay, ScriptedUpstream]) -> None:
    relay, upstream = wire
    async with http_client() as client:
        response = await client.get(f"{relay.url}/cookie")
        assert response.headers["set-cookie"] == "session=secret; Path=/"
    # Same proxy, same pooled upstream connection, a different client without cookies.
    await raw_exchange(relay.url, request_bytes("/echo"))
    assert "cookie" not in upstream.seen[-1].headers
    await raw_exchange(relay.url, request_bytes("/echo", "cookie: mine=1"))
    assert upstream.seen[-1].headers["cookie"] == "mine=1"


@pytest.mark.usefixtures("no_error_logs")
async def test_request_body_framing(wire: tuple[RunningRelay, ScriptedUpstream]) -> None:
    relay, upstream = wire

    async def chunks() -> AsyncIterator[bytes]:
        for part in (b"one,", b"two,", b"three"):
            yield part

    async with http_client() as client:
        await client.get(f"{relay.url}/echo")
        bodiless = upstream.seen[-1]
        assert "transfer-encoding" not in bodiless.headers
        assert "content-length" not in bodiless.headers
        assert bodiless.body == b""
        await client.post(f"{relay.url}/echo", content=b"x" * 5000)
        post = upstream.seen[-1]
        assert post.headers["content-length"] == "5000"
        assert "transfer-encoding" not in post.headers
        assert post.body == b"x" * 5000
        chunked = await client.post(f"{relay.url}/echo", content=chunks())
        seen = upstream.seen[-1]
        assert seen.headers["transfer-encoding"] == "chunked"
        assert "content-length" not in seen.headers
        assert seen.body == chunked.content == b"one,two,three"


@pytest.mark.usefixtures("no_error_logs")
async def test_encoded_response_passes_through_raw(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    relay, _ = wire
    raw = await raw_exchange(relay.url, request_bytes("/gzip", "accept-encoding: gzip"))
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"content-encoding: gzip" in head.lower()
    assert f"content-length: {len(GZIPPED)}".encode() in head.lower()
    assert body == GZIPPED


@pytest.mark.usefixtures("no_error_logs")
async def test_not_modified_with_content_length_keeps_the_connection(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    relay, _ = wire
    async with http_client(timeout=5) as client:
        first = await client.get(f"{relay.url}/304", headers={"if-none-match": '"x"'})
        assert first.status_code == 304
        assert first.content == b""
        # The proxy finished that response cleanly: the same client connection goes on.
        second = await client.get(f"{relay.url}/echo")
        assert second.status_code == 200


@pytest.mark.usefixtures("no_error_logs")
async def test_conflicting_framing_is_never_passed_on(
    wire: tuple[RunningRelay, ScriptedUpstream],
) -> None:
    """Transfer-Encoding with Content-Length: forwarding both would desync the client."""
    relay, _ = wire
    async with http_client(timeout=5) as client:
        response = await client.get(f"{relay.url}/te-cl")
    if response.status_code == 200:  # httpcore decodes it by Transfer-Encoding
        assert "content-length" not in response.headers
        assert response.content == b"hello"
    else:  # aiohttp rejects the response outright
        assert response.status_code == 502
        assert "error=http_protocol_error" in response.headers["proxy-status"]
