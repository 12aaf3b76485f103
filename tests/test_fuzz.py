"""Property tests of the header and path rules, and a live fuzz of raw request heads.

The properties are the proxy's promises, checked on generated input: no header named in
``Connection`` or hop-by-hop gets through, spoofable forwarding claims from untrusted
peers never do, and no accepted path can reach the upstream outside the matched route,
whichever way the upstream decodes it. The live fuzz sends generated heads (mostly almost
valid) over sockets to a real proxy process: every answer is a 4xx or a proxied 2xx, every
connection ends once the client is done, and the upstream (h11, strict) only ever sees
well-formed requests inside the configured routes.
"""

from __future__ import annotations

import ipaddress
import random
import re
import socket
import time
from collections.abc import Iterator
from urllib.parse import unquote, unquote_to_bytes

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.config import RouteConfig
from service.headers import (
    CLAIMED_NAMES,
    FORWARDED_NAMES,
    HOP_BY_HOP,
    RequestContext,
    connection_named,
    downstream_response_headers,
    upstream_request_headers,
)
from service.routing import Router, rewrite_path
from service.server.head_checks import path_problem, routing_path
from tests.support.recording import RecordingUpstream, Seen, recording_upstream_thread
from tests.support.relays import RelayProcess, spawn_relay

# Derandomized: the same examples on every run, so a red CI always means a change broke
# something. To explore further, run with a higher max_examples and derandomize off.
FAST = settings(max_examples=300, deadline=None, database=None, derandomize=True)

# -- headers ------------------------------------------------------------------------------

NAME_POOL = [
    *(n.decode() for n in HOP_BY_HOP),
    *(n.decode() for n in FORWARDED_NAMES | CLAIMED_NAMES),
    "via", "host", "content-length", "x-a", "x-b", "accept", "cookie", "te", "x-secret",
]  # fmt: skip
names = st.sampled_from(NAME_POOL).flatmap(lambda n: st.sampled_from([n, n.upper(), n.title()]))
connection_values = st.lists(
    st.tuples(st.sampled_from(["", " ", "  ", "\t"]), names), min_size=0, max_size=4
).map(lambda items: ",".join(space + name for space, name in items))


@st.composite
def header_lists(draw: st.DrawFn) -> list[tuple[bytes, bytes]]:
    """Headers whose values are unique markers, plus Connection fields naming some."""
    fields: list[tuple[bytes, bytes]] = []
    for index, name in enumerate(draw(st.lists(names, max_size=12))):
        fields.append((name.encode(), b"marker-%d!" % index))
    for value in draw(st.lists(connection_values, max_size=3)):
        position = draw(st.integers(0, len(fields)))
        fields.insert(position, (b"Connection", value.encode()))
    return fields


def marker_names(fields: list[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    return {v: n.lower() for n, v in fields if v.startswith(b"marker-")}


@FAST
@given(header_lists(), st.booleans(), st.booleans())
def test_no_connection_named_or_hop_by_hop_header_goes_upstream(
    fields: list[tuple[bytes, bytes]], trusted: bool, preserve_host: bool
) -> None:
    ctx = RequestContext("192.0.2.7", "http", "1.1", b"edge.example")
    out = upstream_request_headers(
        fields,
        ctx,
        upstream_authority=b"up:80",
        preserve_host=preserve_host,
        via_name=b"relay",
        trusted=[ipaddress.ip_network("192.0.2.0/24")] if trusted else [],
    )
    dropped = HOP_BY_HOP | connection_named((n.lower(), v) for n, v in fields)
    if not trusted:
        dropped |= FORWARDED_NAMES | CLAIMED_NAMES
    markers = marker_names(fields)
    for name, value in out:
        assert name == name.lower()
        assert name not in HOP_BY_HOP
        for marker, original in markers.items():
            if marker in value:
                assert original not in dropped, (original, name, value)
    assert [n for n, _ in out].count(b"host") == 1
    for name, value in out:
        if name == b"content-length":
            assert value.isdigit() and (value == b"0" or not value.startswith(b"0"))


@FAST
@given(header_lists(), st.sampled_from([200, 204, 304, 404]))
def test_no_connection_named_or_hop_by_hop_header_goes_downstream(
    fields: list[tuple[bytes, bytes]], status: int
) -> None:
    out = downstream_response_headers(fields, http_version="1.1", via_name=b"relay", status=status)
    dropped = HOP_BY_HOP | connection_named((n.lower(), v) for n, v in fields)
    markers = marker_names(fields)
    for name, value in out:
        assert name not in dropped or (name == b"via" and value.endswith(b"1.1 relay"))
        for marker, original in markers.items():
            if marker in value:
                assert original not in dropped


# -- paths --------------------------------------------------------------------------------

PIECES = [
    "a", "b", "public", "api", "static", "base", ".", "..", "%2e", "%2E", "%2f", "%2F",
    "%5c", "%5C", "\\", "%25", "%252e", "%252f", "%25252e", ";", ";x=1", "%3B", "%41",
    "%70ublic", "~", "%", "%zz", "%C3%A9", "%2e%2e", ".%2E", "%252e%252e", "%25252E%25252E",
    "..;", "%2e%2e%3b",
]  # fmt: skip
segments = st.lists(st.sampled_from(PIECES), min_size=0, max_size=4).map("".join)
raw_paths = st.lists(segments, min_size=1, max_size=6).map(lambda s: "/" + "/".join(s))
# Mostly under a route's prefix (sometimes spelled encoded), where the stakes are.
ROUTE_STEMS = ["/public", "/api", "/static", "/caf%C3%A9", "/%70ublic", "/public%2F", "/api/..", ""]
routed_paths = st.tuples(st.sampled_from(ROUTE_STEMS), raw_paths).map("".join)

ROUTES = [
    RouteConfig(prefix="/public", upstream="based", strip_prefix=True),
    RouteConfig(prefix="/api/", upstream="plain", strip_prefix=True),
    RouteConfig(prefix="/static", upstream="plain"),
    RouteConfig(prefix="/café", upstream="plain", strip_prefix=True),
]
BASES = {"based": b"/base", "plain": b""}
ROUTER = Router(ROUTES)


def upstream_segments(path: bytes, decodes: int) -> list[bytes] | None:
    """The segments an upstream would serve after decoding ``decodes`` times, splitting on
    ``/`` and ``\\``, dropping ``;`` parameters for dot checks and resolving dot segments
    (RFC 3986 5.2.4); None if it climbed above the root."""
    for _ in range(decodes):
        path = unquote_to_bytes(path)
    resolved: list[bytes] = []
    for segment in re.split(rb"[/\\]", path)[1:]:
        name = segment.split(b";", 1)[0]
        if name == b"..":
            if not resolved:
                return None
            resolved.pop()
        elif name != b".":
            resolved.append(segment)
    return resolved


def required_segments(route: RouteConfig) -> list[bytes]:
    base = [s for s in BASES[route.upstream].split(b"/") if s]
    if route.strip_prefix:
        return base
    return base + [s for s in route.prefix.encode().split(b"/") if s]


@FAST
@given(routed_paths, st.booleans())
def test_an_accepted_path_never_leaves_its_route(path: str, allow_encoded_slashes: bool) -> None:
    try:
        raw = path.encode("ascii")
    except UnicodeEncodeError:
        return  # llhttp refuses non-ASCII targets
    if path_problem(raw, allow_encoded_slashes=allow_encoded_slashes) is not None:
        return
    # What the router sees: uvicorn's decoded path, or the one with slashes kept encoded.
    seen = routing_path(raw) if allow_encoded_slashes else unquote(path)
    route = ROUTER.match(None, seen)
    if route is None:
        return
    forwarded = BASES[route.upstream] + rewrite_path(route, raw)
    assert forwarded.startswith(b"/")
    required = required_segments(route)
    # However often the upstream decodes (with %2F allowed, decoding splits data segments
    # further), it stays under the route's base path, or its prefix when not stripped.
    for decodes in (0, 1, 2, 3):
        view = upstream_segments(forwarded, decodes)
        assert view is not None, (path, forwarded, decodes)
        assert view[: len(required)] == required, (path, forwarded, decodes, view)


@FAST
@given(
    st.lists(st.sampled_from(["a", "b", "v1", "café", "x.y"]), min_size=1, max_size=3),
    st.lists(st.sampled_from(["", "x", "%2F", "a%20b", "..dots"]), max_size=3),
    st.randoms(use_true_random=False),
)
def test_rewrite_path_strips_exactly_the_prefix_however_it_was_encoded(
    prefix_segments: list[str], rest_segments: list[str], rnd: random.Random
) -> None:
    prefix = "/" + "/".join(prefix_segments)
    route = RouteConfig(prefix=prefix, upstream="up", strip_prefix=True)
    # Percent-encode a random choice of the prefix's bytes (never its slashes).
    encoded = b"".join(
        b"%%%02X" % byte if byte != 0x2F and rnd.random() < 0.3 else bytes([byte])
        for byte in prefix.encode()
    )
    rest = ("/" + "/".join(rest_segments)).encode() if rest_segments else b""
    assert rewrite_path(route, encoded + rest) == (rest or b"/")
    unstripped = RouteConfig(prefix=prefix, upstream="up")
    assert rewrite_path(unstripped, encoded + rest) == encoded + rest


# -- live fuzz ----------------------------------------------------------------------------

LIMITS = {
    "max_request_target_bytes": 512,
    "max_header_bytes": 1024,
    "max_header_count": 16,
    "max_body_bytes": 64,
}
BENIGN_PIECES = ["a", "b", "x.y", "%41", "%20", "~", ";p=1", "%C3%A9", "..a", ".b", "base"]
benign_paths = st.lists(
    st.lists(st.sampled_from(BENIGN_PIECES), max_size=3).map("".join), max_size=4
).map(lambda s: "".join("/" + p for p in s))
# A valid request, then a few mutations from these (each a way of being hostile).
MUTATIONS = {
    "method": ["get", "FOO", "CONNECT", "HEAD", "OPTIONS"],
    "target": ["http://evil.example/public", "*", "evil.example:443", "//evil.example/public",
               "/static/" + "x" * 600, "/public#frag", "/other"],
    "path": PIECES,
    "version": ["HTTP/1.0", "HTTP/2.0", "HTTP/1.2", "HTTP/0.9", "http/1.1", ""],
    "host": ["Host: a@b", "Host:", "Host: evil.example:8080", "Host: [::1]", "Host: a b",
             "Host: t\r\nHost: u", None],
    "framing": ["Content-Length: 005", "Content-Length: 5, 5", "Content-Length: -1",
                "Content-Length: 99999999999999999999", "Content-Length: 100",
                "Transfer-Encoding: xchunked", "Transfer-Encoding:\tchunked",
                "Transfer-Encoding: chunked, identity", "Transfer-Encoding: gzip, chunked",
                "Transfer-Encoding : chunked", "Content-Length: 5\r\nTransfer-Encoding: chunked"],
    "field": ["X-A: b\r\n folded", "Bad Name: x", "X-A: \x00", "Connection: x-a",
              "Expect: 100-continue", "X-Forwarded-For: 6.6.6.6", "Forwarded: for=6.6.6.6",
              "X-Real-IP: 6.6.6.6", "Connection: upgrade\r\nUpgrade: h2c",
              "X-Long: " + "a" * 1100, "\r\n".join(f"X-{i}: v" for i in range(20))],
    "body": [b"FFFFFFFFFFFFFFFFFF\r\nx\r\n0\r\n\r\n", b"3\r\nhello\r\n0\r\n\r\n",
             b"5;a=b\r\nhello\r\n0\r\n\r\n", b"x" * 100, b"5\r\nhello\r\n",
             b"0\r\n\r\nGET /static/pipelined HTTP/1.1\r\nHost: t\r\n\r\n"],
    "eol": ["\n"],
}  # fmt: skip


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    mutated = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=2, unique=True))

    def pick(kind: str, default: object) -> object:
        return draw(st.sampled_from(MUTATIONS[kind])) if kind in mutated else default

    method = str(pick("method", draw(st.sampled_from(["GET", "POST", "PUT", "DELETE"]))))
    target = draw(st.sampled_from(["/public", "/static"])) + draw(benign_paths)
    if "path" in mutated:
        target += "/" + draw(segments)
    target = str(pick("target", target))
    if draw(st.booleans()):
        target += "?" + draw(st.sampled_from(["q=1", "a=%2F..%2F", "x=/../"]))
    version = pick("version", "HTTP/1.1")
    fields = [pick("host", "Host: t")]
    body = draw(st.sampled_from([b"", b"hello"])) if method != "GET" else b""
    if body:
        kind = draw(st.sampled_from(["length", "chunked"]))
        if kind == "chunked":
            fields.append("Transfer-Encoding: chunked")
            body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        else:
            fields.append(f"Content-Length: {len(body)}")
    if "framing" in mutated:
        fields.append(draw(st.sampled_from(MUTATIONS["framing"])))
    if "field" in mutated:
        fields.append(draw(st.sampled_from(MUTATIONS["field"])))
    body = bytes(pick("body", body))  # type: ignore[call-overload]
    if draw(st.integers(0, 3)):
        fields.append("Connection: close")
    fields = [f for f in draw(st.permutations(fields)) if f is not None]
    eol = str(pick("eol", "\r\n"))
    head = f"{method} {target} {version}" + eol + "".join(f + eol for f in fields) + eol
    return head.replace("\r\n", eol).encode("latin-1") + body


STATUS_LINE = re.compile(rb"(?m)^HTTP/1\.1 (\d{3}) ")


def converse(port: int, data: bytes) -> tuple[list[int], bool]:
    """Send ``data``; read until the proxy closes. Once answers stop coming, the client
    half-closes, as a client that is done would: the proxy must then close too. Returns
    the response statuses and whether the connection ended in bounded time."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + 10
        half_closed = False
        while time.monotonic() < deadline:
            # Quiet for a moment after an answer, or for longer before any: done sending.
            sock.settimeout(0.3 if received else 1.5)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if half_closed:
                    continue
                sock.shutdown(socket.SHUT_WR)
                half_closed = True
                continue
            except ConnectionResetError:
                return [int(s) for s in STATUS_LINE.findall(received)], True
            if not chunk:
                return [int(s) for s in STATUS_LINE.findall(received)], True
            received += chunk
    return [int(s) for s in STATUS_LINE.findall(received)], False


def inside_routes(seen: Seen) -> bool:
    path = seen.target.split(b"?", 1)[0]
    if path == b"/base" or path.startswith(b"/base/"):
        required = [b"base"]
    elif path == b"/static" or path.startswith(b"/static/"):
        required = [b"static"]
    else:
        return False
    for decodes in (0, 1, 2):
        view = upstream_segments(path, decodes)
        if view is None or view[: len(required)] != required:
            return False
    return True


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[RelayProcess, RecordingUpstream]]:
    with recording_upstream_thread() as upstream:
        config = {
            "upstreams": {
                "based": {"url": f"{upstream.url}/base"},
                "plain": {"url": upstream.url},
            },
            "routes": [
                {"prefix": "/public", "upstream": "based", "strip_prefix": True},
                {"prefix": "/static", "upstream": "plain"},
            ],
            "limits": LIMITS,
            "log": {"access_log": False},
        }
        with spawn_relay(config, tmp_path_factory.mktemp("fuzz")) as relay:
            yield relay, upstream


@pytest.mark.live
@settings(
    max_examples=120,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request_heads())
def test_live_fuzz_of_raw_request_heads(
    live: tuple[RelayProcess, RecordingUpstream], data: bytes
) -> None:
    relay, upstream = live
    port = int(relay.url.rsplit(":", 1)[1])
    since = len(upstream.arrivals)
    statuses, ended = converse(port, data)
    assert ended, f"connection still open 10 s after the client was done: {data!r}"
    for status in statuses:
        # 100 Continue may precede the answer of a request with Expect: 100-continue.
        assert status == 100 or 200 <= status < 300 or 400 <= status < 500, (status, data)
    assert upstream.problems() == [], data
    for seen in upstream.arrivals[since:]:
        assert inside_routes(seen), (seen.target, data)
        assert len(seen.body) <= LIMITS["max_body_bytes"]
    assert relay.process.poll() is None, relay.log()


@pytest.mark.live
def test_the_fuzzed_proxy_logged_no_errors(live: tuple[RelayProcess, RecordingUpstream]) -> None:
    relay, _ = live
    errors = [line for line in relay.log().splitlines() if '"level": "ERROR"' in line]
    assert errors == []
