"""Header rewriting for both directions (RFC 9110 section 7.6).

Works on ASGI-style lists of ``(bytes, bytes)`` pairs so duplicates and order survive.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

RawHeaders = list[tuple[bytes, bytes]]

# RFC 9110 7.6.1 plus the legacy names that are hop-by-hop in practice.
HOP_BY_HOP: frozenset[bytes] = frozenset(
    {
        b"connection",
        b"proxy-connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
FORWARDED_NAMES: frozenset[bytes] = frozenset(
    {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded"}
)

TrustedNetworks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any ``Connection`` field; those are hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(names)


def strip_hop_by_hop(headers: Iterable[tuple[bytes, bytes]]) -> RawHeaders:
    headers = list(headers)
    drop = HOP_BY_HOP | connection_named(headers)
    return [(n, v) for n, v in headers if n.lower() not in drop]


def peer_is_trusted(peer: str | None, trusted: TrustedNetworks) -> bool:
    if peer is None or not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def _first(headers: RawHeaders, name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _joined(headers: RawHeaders, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    return b", ".join(values) if values else None


@dataclass(frozen=True)
class RequestContext:
    """What the downstream connection tells us about a request."""

    peer: str | None
    scheme: str
    http_version: str
    host: bytes | None


def upstream_request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    ctx: RequestContext,
    *,
    upstream_authority: bytes,
    preserve_host: bool,
    via_name: bytes,
    trusted: TrustedNetworks,
) -> RawHeaders:
    """Headers to send upstream: hop-by-hop removed, Host set, Via and X-Forwarded-* added."""
    lowered = [(n.lower(), v) for n, v in raw]
    headers = strip_hop_by_hop(lowered)
    trusted_peer = peer_is_trusted(ctx.peer, trusted)

    prior_for = _joined(headers, b"x-forwarded-for") if trusted_peer else None
    prior_proto = _first(headers, b"x-forwarded-proto") if trusted_peer else None
    prior_host = _first(headers, b"x-forwarded-host") if trusted_peer else None
    prior_via = _joined(headers, b"via")

    out = [(n, v) for n, v in headers if n not in FORWARDED_NAMES and n not in (b"host", b"via")]
    host = ctx.host if preserve_host and ctx.host else upstream_authority
    out.insert(0, (b"host", host))

    hop = f"{ctx.http_version} ".encode() + via_name
    out.append((b"via", prior_via + b", " + hop if prior_via else hop))
    if ctx.peer is not None:
        peer = ctx.peer.encode()
        out.append((b"x-forwarded-for", prior_for + b", " + peer if prior_for else peer))
    elif prior_for:
        out.append((b"x-forwarded-for", prior_for))
    out.append((b"x-forwarded-proto", prior_proto or ctx.scheme.encode()))
    forwarded_host = prior_host or ctx.host
    if forwarded_host:
        out.append((b"x-forwarded-host", forwarded_host))
    return out


def downstream_response_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    http_version: str,
    via_name: bytes,
    status: int | None = None,
) -> RawHeaders:
    """Headers to send to the client: hop-by-hop removed and this hop added to ``Via``."""
    lowered = [(n.lower(), v) for n, v in raw]
    headers = strip_hop_by_hop(lowered)
    if status in (204, 304) or any(n == b"transfer-encoding" for n, _ in lowered):
        # No body follows a 204 or 304, whatever Content-Length says (a 304 may carry the
        # representation's), and the ASGI server would wait for that many bytes. With
        # Transfer-Encoding, that framing overrides Content-Length (RFC 9112 6.3): a proxy
        # must not forward the Content-Length with the decoded body.
        headers = [(n, v) for n, v in headers if n != b"content-length"]
    prior_via = _joined(headers, b"via")
    out = [(n, v) for n, v in headers if n != b"via"]
    hop = f"{http_version} ".encode() + via_name
    out.append((b"via", prior_via + b", " + hop if prior_via else hop))
    return out


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request framing announces a body (RFC 9112 6.3)."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True
        if lname == b"content-length" and value.strip() != b"0":
            return True
    return False
