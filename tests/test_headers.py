"""Header rewriting rules (RFC 9110 7.6) as pure functions."""

from __future__ import annotations

import ipaddress

from service.headers import (
    RequestContext,
    downstream_response_headers,
    has_body,
    strip_hop_by_hop,
    upstream_request_headers,
)

CTX = RequestContext(peer="203.0.113.7", scheme="https", http_version="1.1", host=b"edge.example")
TRUSTED = [ipaddress.ip_network("203.0.113.0/24")]


def names(headers: list[tuple[bytes, bytes]]) -> set[bytes]:
    return {n for n, _ in headers}


def get(headers: list[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    return [v for n, v in headers if n == name]


def test_hop_by_hop_and_connection_named_headers_are_removed() -> None:
    raw = [
        (b"Connection", b"keep-alive, X-Secret"),
        (b"Keep-Alive", b"timeout=5"),
        (b"TE", b"trailers"),
        (b"Trailer", b"x"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"websocket"),
        (b"Proxy-Authorization", b"Basic x"),
        (b"Proxy-Connection", b"keep-alive"),
        (b"X-Secret", b"1"),
        (b"X-Kept", b"2"),
    ]
    assert names(strip_hop_by_hop((n.lower(), v) for n, v in raw)) == {b"x-kept"}


def test_request_headers_untrusted_peer_drops_forwarded_values() -> None:
    raw = [
        (b"host", b"edge.example"),
        (b"x-forwarded-for", b"1.2.3.4"),
        (b"x-forwarded-proto", b"gopher"),
        (b"x-forwarded-host", b"evil"),
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
    out = downstream_response_headers(raw, http_version="1.1", via_name=b"relay")
    assert get(out, b"content-length") == [b"10"]
    assert get(out, b"content-encoding") == [b"gzip"]
    assert get(out, b"set-cookie") == [b"a=1", b"b=2"]
    assert b"x-hop" not in names(out) and b"connection" not in names(out)
    assert get(out, b"via") == [b"1.1 relay"]


def test_has_body() -> None:
    assert not has_body([(b"host", b"x")])
    assert not has_body([(b"content-length", b"0")])
    assert has_body([(b"content-length", b"5")])
    assert has_body([(b"transfer-encoding", b"chunked")])
