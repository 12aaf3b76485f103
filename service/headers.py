"""Header rewriting for both directions (RFC 9110 section 7.6).

Works on ASGI-style lists of ``(bytes, bytes)`` pairs so duplicates and order survive.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .route_policy import HeaderEdits

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
# Claims about the client or the original request that upstream software acts on (client
# address, scheme, port, path prefix; X-Original-URL even reroutes some frameworks). Only a
# trusted proxy may make them: from anyone else they are dropped.
CLAIMED_NAMES: frozenset[bytes] = frozenset(
    {
        b"x-real-ip",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-server",
        b"x-original-url",
        b"x-rewrite-url",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
    }
)

# Request fields upstream_request_headers reads and writes itself, never passed through as sent.
_READ_UPSTREAM: frozenset[bytes] = FORWARDED_NAMES | {b"host", b"via", b"content-length"}

TrustedNetworks = Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _connection_tokens(value: bytes) -> list[bytes]:
    return [t.strip().lower() for t in value.split(b",") if t.strip()]


def connection_named(headers: Iterable[tuple[bytes, bytes]]) -> frozenset[bytes]:
    """Header names listed in any ``Connection`` field; those are hop-by-hop too."""
    names: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            names.update(_connection_tokens(value))
    return frozenset(names)


def peer_is_trusted(peer: str | None, trusted: TrustedNetworks) -> bool:
    if peer is None or not trusted:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def first_value(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for n, v in headers:
        if n == name:
            return v
    return None


def _joined(headers: RawHeaders, name: bytes) -> bytes | None:
    values = [v for n, v in headers if n == name]
    return b", ".join(values) if values else None


def _forwarded_node(peer: str) -> bytes:
    return f'"[{peer}]"'.encode() if ":" in peer else peer.encode()


def _quoted(value: bytes) -> bytes:
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _canonical_length(value: bytes) -> bytes | None:
    value = value.strip()
    return str(int(value)).encode() if value.isdigit() else None


@dataclass(frozen=True)
class RequestContext:
    """What the downstream connection tells us about a request."""

    peer: str | None
    scheme: str
    http_version: str
    host: bytes | None
    trusted: bool | None = None  # the peer is a trusted proxy; None: look it up


def _lowered_and_dropped(raw: Iterable[tuple[bytes, bytes]]) -> tuple[RawHeaders, set[bytes]]:
    """Names lowercased, and the hop-by-hop names: the fixed ones plus any that a
    ``Connection`` field lists (one pass: this runs twice per proxied request)."""
    lowered: RawHeaders = []
    drop = set(HOP_BY_HOP)
    for name, value in raw:
        name = name.lower()
        lowered.append((name, value))
        if name == b"connection":
            drop.update(_connection_tokens(value))
    return lowered, drop


def upstream_request_headers(
    raw: Iterable[tuple[bytes, bytes]],
    ctx: RequestContext,
    *,
    upstream_authority: bytes,
    preserve_host: bool,
    via_name: bytes,
    trusted: TrustedNetworks,
    request_id: tuple[bytes, bytes] | None = None,
    edits: HeaderEdits | None = None,
) -> RawHeaders:
    """Headers to send upstream: hop-by-hop removed, Host set, Via and X-Forwarded-* added,
    and ``request_id`` (a field) in place of any the client sent under its name; ``edits``:
    the route's request header policy (never a field named here: config refuses them)."""
    lowered, drop = _lowered_and_dropped(raw)
    trusted_peer = peer_is_trusted(ctx.peer, trusted) if ctx.trusted is None else ctx.trusted
    if request_id is not None:
        drop.add(request_id[0])
    if edits is not None:
        drop |= edits.drop
    if not trusted_peer:
        drop |= CLAIMED_NAMES
    prior_for: list[bytes] = []
    prior_via: list[bytes] = []
    prior_forwarded: list[bytes] = []
    prior_proto = prior_host = length = None
    out: RawHeaders = []
    for name, value in lowered:
        if name in drop:
            continue
        if name in _READ_UPSTREAM:
            if name == b"via":
                prior_via.append(value)
            elif name == b"content-length":
                length = value if length is None else length
            elif trusted_peer:
                if name == b"x-forwarded-for":
                    prior_for.append(value)
                elif name == b"x-forwarded-proto":
                    prior_proto = value if prior_proto is None else prior_proto
                elif name == b"x-forwarded-host":
                    prior_host = value if prior_host is None else prior_host
                elif name == b"forwarded":
                    prior_forwarded.append(value)
            continue
        out.append((name, value))
    if length is not None and (canonical := _canonical_length(length)) is not None:
        # Canonical digits ("005" is 5): the upstream must read the same length we framed.
        out.append((b"content-length", canonical))
    host = ctx.host if preserve_host and ctx.host else upstream_authority
    out.insert(0, (b"host", host))

    hop = f"{ctx.http_version} ".encode() + via_name
    out.append((b"via", b", ".join([*prior_via, hop])))
    forwarded_for = b", ".join(prior_for) if prior_for else None
    if ctx.peer is not None:
        peer = ctx.peer.encode()
        out.append((b"x-forwarded-for", forwarded_for + b", " + peer if forwarded_for else peer))
    elif forwarded_for:
        out.append((b"x-forwarded-for", forwarded_for))
    out.append((b"x-forwarded-proto", prior_proto or ctx.scheme.encode()))
    forwarded_host = prior_host or ctx.host
    if forwarded_host:
        out.append((b"x-forwarded-host", forwarded_host))
    if prior_forwarded:
        # RFC 7239: a trusted proxy's list, with this hop's element appended.
        element = b"proto=" + ctx.scheme.encode()
        if ctx.peer is not None:
            element = b"for=" + _forwarded_node(ctx.peer) + b";" + element
        if ctx.host:
            element += b";host=" + _quoted(ctx.host)
        out.append((b"forwarded", b", ".join([*prior_forwarded, element])))
    if request_id is not None:
        out.append(request_id)
    if edits is not None:
        out += edits.add
    return out


def downstream_response_headers(
    raw: Iterable[tuple[bytes, bytes]],
    *,
    http_version: str,
    via_name: bytes,
    status: int | None = None,
    request_id: tuple[bytes, bytes] | None = None,
    edits: HeaderEdits | None = None,
) -> RawHeaders:
    """Headers to send to the client: hop-by-hop removed and this hop added to ``Via``, and
    ``request_id`` (a field) in place of any the upstream sent under its name: the client
    gets the id that the proxy logged; ``edits``: the route's response header policy."""
    lowered, drop = _lowered_and_dropped(raw)
    if request_id is not None:
        drop.add(request_id[0])
    if edits is not None:
        drop |= edits.drop
    if status in (204, 304) or any(n == b"transfer-encoding" for n, _ in lowered):
        # No body follows a 204 or 304, whatever Content-Length says (a 304 may carry the
        # representation's), and the ASGI server would wait for that many bytes. With
        # Transfer-Encoding, that framing overrides Content-Length (RFC 9112 6.3): a proxy
        # must not forward the Content-Length with the decoded body.
        drop.add(b"content-length")
    prior_via: list[bytes] = []
    out: RawHeaders = []
    for name, value in lowered:
        if name in drop:
            continue
        if name == b"via":
            prior_via.append(value)
        else:
            out.append((name, value))
    hop = f"{http_version} ".encode() + via_name
    out.append((b"via", b", ".join([*prior_via, hop])))
    if request_id is not None:
        out.append(request_id)
    if edits is not None:
        out += edits.add
    return out


def forwarded_client(
    headers: Iterable[tuple[bytes, bytes]], peer: str, trusted: TrustedNetworks
) -> str:
    """The client a trusted peer forwarded the request for, as nginx's realip module finds
    it with ``real_ip_recursive on``: ``X-Forwarded-For`` read from the right, skipping the
    addresses of trusted proxies; the first other address is the client. An element that is
    not an IP address ends the walk at the last address reached (the peer, at worst). An
    element may carry a port, as some load balancers write it (``203.0.113.7:4711``,
    ``[2001:db8::1]:4711``); the port is dropped."""
    elements = [
        element.strip()
        for name, value in headers
        if name == b"x-forwarded-for"
        for element in value.split(b",")
    ]
    client = peer
    for element in reversed(elements):
        address = _forwarded_address(element.decode("latin-1"))
        if address is None:
            break
        client = str(address)
        if not any(address in network for network in trusted):
            break
    return client


def _forwarded_address(element: str) -> IPAddress | None:
    """The address of one ``X-Forwarded-For`` element, without a port; None if it is none."""
    if element.startswith("["):
        host, bracket, rest = element[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        element = host
    elif element.count(":") == 1:
        host, _, port = element.partition(":")
        if not port.isdigit():
            return None
        element = host
    try:
        return ipaddress.ip_address(element)
    except ValueError:
        return None


def has_body(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    """True when the request framing announces a body (RFC 9112 6.3)."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"transfer-encoding":
            return True
        if lname == b"content-length" and value.strip() != b"0":
            return True
    return False
