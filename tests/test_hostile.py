"""Hostile input over real sockets: request smuggling, SSRF-shaped targets and Host values,
the request limits, spoofed forwarding headers and the admin paths on the proxy port.

Each smuggling attempt goes to a proxy in front of an upstream that records the exact bytes
it received and parses them with h11: it must have received nothing, or exactly the one
well-formed request the proxy framed itself.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import pytest_asyncio

from service.headers import CLAIMED_NAMES, RequestContext, upstream_request_headers
from service.server.head_checks import head_problem, path_problem, routing_path
from tests.support.metrics import metric
from tests.support.net import eventually
from tests.support.recording import ConnectionLog, RecordingUpstream
from tests.support.relays import RunningRelay, run_relay
from tests.support.wire import Response, chunked, connect, exchange, head, read_response

pytestmark = pytest.mark.usefixtures("no_error_logs")


@asynccontextmanager
async def proxy(**config: Any) -> AsyncIterator[tuple[RunningRelay, RecordingUpstream]]:
    """A proxy whose only upstream records what it receives; by default ``/`` routes to it."""
    upstream = RecordingUpstream()
    async with upstream.running():
        full = {
            "upstreams": {"up": {"url": upstream.url, **config.pop("upstream", {})}},
            "routes": [{"prefix": "/", "upstream": "up"}],
            **config,
        }
        async with run_relay(full) as running:
            yield running, upstream


Shared = tuple[RunningRelay, RecordingUpstream]
# Tests that share one proxy (and its upstream) per module look only at what they add.
SHARED = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared() -> AsyncIterator[Shared]:
    async with proxy() as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_based() -> AsyncIterator[Shared]:
    async with based_proxy() as running:
        yield running


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def shared_slashes() -> AsyncIterator[Shared]:
    async with based_proxy(allow_encoded_slashes=True) as running:
        yield running


POST = "POST / HTTP/1.1"
HOST = "Host: t"


def chunked_post(body: bytes, *lines: str) -> bytes:
    """A POST that says ``Transfer-Encoding: chunked`` (then ``lines``), and ``body`` as is."""
    return head(POST, HOST, "Transfer-Encoding: chunked", *lines, body=body)


# Framings a front end and a back end could read differently, and malformed framing.
SMUGGLING = {
    "cl_and_te": head(
        POST, HOST, "Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n"
    ),
    "te_and_cl": chunked_post(b"0\r\n\r\n", "Content-Length: 5"),
    "te_and_cl_0": chunked_post(b"0\r\n\r\n", "Content-Length: 0"),
    "cl_twice_same": head(POST, HOST, "Content-Length: 5", "Content-Length: 5", body=b"hello"),
    "cl_twice_different": head(
        POST, HOST, "Content-Length: 5", "Content-Length: 6", body=b"hello!"
    ),
    "cl_list": head(POST, HOST, "Content-Length: 5, 5", body=b"hello"),
    "cl_plus": head(POST, HOST, "Content-Length: +5", body=b"hello"),
    "cl_negative": head(POST, HOST, "Content-Length: -1", body=b"hello"),
    "cl_empty": head(POST, HOST, "Content-Length:", body=b"hello"),
    "cl_hex": head(POST, HOST, "Content-Length: 0x5", body=b"hello"),
    "cl_overflow": head(POST, HOST, "Content-Length: 18446744073709551621", body=b"hello"),
    "te_xchunked": head(POST, HOST, "Transfer-Encoding: xchunked", body=b"0\r\n\r\n"),
    "te_chunked_identity": head(
        POST, HOST, "Transfer-Encoding: chunked, identity", body=b"0\r\n\r\n"
    ),
    "te_identity": head(
        POST, HOST, "Transfer-Encoding: identity", "Content-Length: 5", body=b"hello"
    ),
    "te_gzip_chunked": head(
        POST, HOST, "Transfer-Encoding: gzip, chunked", body=b"5\r\nhello\r\n0\r\n\r\n"
    ),
    "te_chunked_twice": head(POST, HOST, "Transfer-Encoding: chunked, chunked", body=b"0\r\n\r\n"),
    "te_two_fields": chunked_post(b"0\r\n\r\n", "Transfer-Encoding: chunked"),
    "te_empty": head(POST, HOST, "Transfer-Encoding:", "Content-Length: 5", body=b"hello"),
    "te_vertical_tab": head(POST, HOST, "Transfer-Encoding:\x0bchunked", body=b"0\r\n\r\n"),
    "te_form_feed": head(POST, HOST, "Transfer-Encoding:\x0cchunked", body=b"0\r\n\r\n"),
    "te_nbsp": head(POST, HOST, "Transfer-Encoding:\xa0chunked", body=b"0\r\n\r\n"),
    "te_space_before_colon": head(POST, HOST, "Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
    "te_tab_before_colon": head(POST, HOST, "Transfer-Encoding\t: chunked", body=b"0\r\n\r\n"),
    "te_line_folded": head(POST, HOST, "Transfer-Encoding:", " chunked", body=b"0\r\n\r\n"),
    "te_leading_space_line": head(POST, HOST, " Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    "te_in_http10": head("POST / HTTP/1.0", HOST, "Transfer-Encoding: chunked", body=b"0\r\n\r\n"),
    "obs_fold": head(POST, HOST, "X-A: b", " c", "Content-Length: 5", body=b"hello"),
    "bare_lf": b"GET / HTTP/1.1\nHost: t\n\n",
    "bare_lf_in_head": b"GET / HTTP/1.1\r\nHost: t\nX-A: b\r\n\r\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: t\rX-A: b\r\n\r\n",
    "chunk_lf_only": chunked_post(b"5\nhello\n0\n\n"),
    "chunk_size_overflow": chunked_post(b"FFFFFFFFFFFFFFFFF5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_2_64_plus_5": chunked_post(b"10000000000000005\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_negative": chunked_post(b"-5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_0x": chunked_post(b"0x5\r\nhello\r\n0\r\n\r\n"),
    "chunk_size_space": chunked_post(b"5 \r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_nul": chunked_post(b"5;\x00\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_bare_lf": chunked_post(b"5;a\nb\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_space_before": chunked_post(b"5 ;a\r\nhello\r\n0\r\n\r\n"),
    "chunk_ext_unterminated_quote": chunked_post(b'5;a="b\r\nhello\r\n0\r\n\r\n'),
    "chunk_data_overrun": chunked_post(b"5\r\nhelloXX\r\n0\r\n\r\n"),
    "trailer_content_length": chunked_post(b"5\r\nhello\r\n0\r\nContent-Length: 5\r\n\r\n"),
    "upgrade_with_body": head(
        POST, HOST, "Connection: upgrade", "Upgrade: foo", "Content-Length: 5", body=b"hello"
    ),
    "http09": b"GET /\r\n\r\n",
    "http20_request_line": head("GET / HTTP/2.0", HOST),
    "http12": head("GET / HTTP/1.2", HOST),
    "nul_in_value": head("GET / HTTP/1.1", HOST, "X-A: a\x00b"),
    "ctl_in_value": head("GET / HTTP/1.1", HOST, "X-A: a\x01b"),
    "empty_header_name": head("GET / HTTP/1.1", HOST, ": x"),
    "lowercase_method": head("get / HTTP/1.1", HOST),
    "space_in_target": head("GET /a b HTTP/1.1", HOST),
}


@SHARED
@pytest.mark.parametrize("name", sorted(SMUGGLING))
async def test_smuggling_attempts_are_refused_and_reach_no_upstream(
    name: str, shared: Shared
) -> None:
    running, upstream = shared
    received = upstream.received_bytes()
    refusals = await metric(running, "relay_requests_total", upstream="-", code="400")
    responses = await exchange(running.url, SMUGGLING[name])
    assert [r[0] for r in responses] == [400], responses
    _, headers, body = responses[0]
    assert headers["connection"] == "close"
    assert headers["proxy-status"] == "relay; error=http_request_error"
    assert body.startswith(b"400 Bad Request: malformed request")
    assert upstream.received_bytes() == received
    assert await metric(running, "relay_requests_total", upstream="-", code="400") == refusals + 1


HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: t\r\n\r\n"

# Valid, if unusual: forwarded as exactly one request, framed by the proxy itself.
ACCEPTED = {
    # Optional whitespace around a field value is part of HTTP (RFC 9110 5.5); the client's
    # framing fields are never forwarded, so nothing downstream can read them differently.
    "te_tab": (head(POST, HOST, "Transfer-Encoding:\tchunked", body=chunked(b"hello")), b"hello"),
    "te_two_spaces": (head(POST, HOST, "Transfer-Encoding:  chunked", body=chunked(b"hi")), b"hi"),
    "te_trailing_space": (
        head(POST, HOST, "Transfer-Encoding: chunked ", body=chunked(b"x")),
        b"x",
    ),
    "te_uppercase": (head(POST, HOST, "Transfer-Encoding: CHUNKED", body=chunked(b"ab")), b"ab"),
    "cl_leading_zeros": (head(POST, HOST, "Content-Length: 005", body=b"hello"), b"hello"),
    "chunk_extension": (
        chunked_post(b"5;a=b\r\nhello\r\n0\r\n\r\n"),
        b"hello",
    ),
    "chunk_extension_quoted": (
        chunked_post(b'5;a="b c"\r\nhello\r\n0\r\n\r\n'),
        b"hello",
    ),
    # A request hidden in a body is body data, not a second request.
    "hidden_in_length_body": (
        head(POST, HOST, f"Content-Length: {len(HIDDEN)}", body=HIDDEN),
        HIDDEN,
    ),
    "hidden_in_chunk": (
        chunked_post(chunked(b"0\r\n\r\n" + HIDDEN)),
        b"0\r\n\r\n" + HIDDEN,
    ),
}


@SHARED
@pytest.mark.parametrize("name", sorted(ACCEPTED))
async def test_odd_but_valid_framing_reaches_the_upstream_as_one_request(
    name: str, shared: Shared
) -> None:
    running, upstream = shared
    data, body = ACCEPTED[name]
    since = len(upstream.arrivals)
    responses = await exchange(running.url, data)
    assert [r[0] for r in responses] == [200, 200], responses
    assert all(r[1].get("x-upstream") == "raw" for r in responses)
    assert upstream.problems() == []
    assert [(r.method, r.target, r.body) for r in upstream.arrivals[since:]] == [
        (b"POST", b"/", body),
        (b"GET", b"/sentinel", b""),
    ]
    forwarded = upstream.arrivals[since]
    lengths = forwarded.header(b"content-length")
    assert lengths in ([str(len(body)).encode()], []), forwarded.headers
    if not lengths:
        assert forwarded.header(b"transfer-encoding") == [b"chunked"]


@SHARED
async def test_a_pipelined_request_is_forwarded_as_its_own_request(shared: Shared) -> None:
    """The contrast to the hidden ones: after the body ends, the next request is a request."""
    running, upstream = shared
    since = len(upstream.arrivals)
    data = head(POST, HOST, "Content-Length: 5", body=b"hello") + HIDDEN
    responses = await exchange(running.url, data)
    assert [r[0] for r in responses] == [200, 200, 200]
    assert [r.target for r in upstream.arrivals[since:]] == [b"/", b"/smuggled", b"/sentinel"]
    assert upstream.problems() == []


@SHARED
async def test_a_malformed_request_pipelined_behind_a_good_one_forwards_neither(
    shared: Shared,
) -> None:
    """Any answer would be taken for the first request's: the connection is dropped, and
    nothing parsed from that read reaches the upstream."""
    running, upstream = shared
    received = upstream.received_bytes()
    bad = head(POST, HOST, "Content-Length: 5", "Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    responses = await exchange(running.url, head("GET /first HTTP/1.1", HOST) + bad)
    assert responses == []
    assert upstream.received_bytes() == received


@SHARED
async def test_a_body_error_after_forwarding_began_aborts_the_upstream_request(
    shared: Shared,
) -> None:
    """The head and part of the body went upstream in an earlier read: the client gets 400,
    the upstream a request whose end never comes, on a connection closed and never reused."""
    running, upstream = shared
    since = len(upstream.arrivals)
    reader, writer = await connect(running.url)
    writer.write(chunked_post(b"5\r\nhello\r\n"))
    await writer.drain()

    def aborting() -> list[ConnectionLog]:
        return [c for c in upstream.connections if c.partial and not c.closed]

    await eventually(lambda: any(c.partial and c.partial.body for c in aborting()))
    [aborted] = aborting()
    completed = len(aborted.requests)
    writer.write(b"zz\r\n")  # not a chunk size
    await writer.drain()
    async with asyncio.timeout(10):
        response = await read_response(reader)
        assert response is not None and response[0] == 400
        assert await reader.read() == b""
    writer.close()
    await eventually(lambda: aborted.closed)
    next_request = head("GET /next HTTP/1.1", HOST, "Connection: close")
    responses = await exchange(running.url, next_request, sentinel=False)
    assert responses[0][0] == 200
    assert upstream.problems() == []
    assert len(aborted.requests) == completed and aborted.partial is not None
    assert aborted.partial.body == b"hello"
    assert [r.target for r in upstream.arrivals[since:]] == [b"/next"]


# -- SSRF: the upstream is the configured one, the path stays where the route put it -------


@SHARED
@pytest.mark.parametrize(
    "data",
    [
        head("GET http://evil.example/ HTTP/1.1", HOST),
        head("GET http://127.0.0.1:1/admin HTTP/1.1", HOST),
        head("GET https://evil.example HTTP/1.1", "Host: evil.example"),
        head("CONNECT evil.example:443 HTTP/1.1", "Host: evil.example:443"),
        head("CONNECT /public HTTP/1.1", HOST),
        head("OPTIONS * HTTP/1.1", HOST),
        head("GET evil.example/ HTTP/1.1", HOST),
        head("GET /public#/../admin HTTP/1.1", HOST),
    ],
)
async def test_targets_not_in_origin_form_are_refused(data: bytes, shared: Shared) -> None:
    running, upstream = shared
    received = upstream.received_bytes()
    responses = await exchange(running.url, data)
    assert [r[0] for r in responses] == [400], responses
    assert upstream.received_bytes() == received


@SHARED
@pytest.mark.parametrize(
    "host_lines",
    [
        ["Host: a@evil.example"],
        ["Host: user:pw@evil.example:80"],
        ["Host:"],
        ["Host: t", "Host: evil.example"],
        ["Host: t", "Host: t"],
        [],  # HTTP/1.1 without Host
        ["Host: evil.example/path"],
        ["Host: evil.example?x"],
        ["Host: evil example"],
        ["Host: evil.example:"],
        ["Host: evil.example:80:80"],
        ["Host: %65vil.example"],
        ["Host: [::1"],
    ],
)
async def test_odd_host_values_are_refused(host_lines: list[str], shared: Shared) -> None:
    running, upstream = shared
    received = upstream.received_bytes()
    responses = await exchange(running.url, head("GET / HTTP/1.1", *host_lines))
    assert [r[0] for r in responses] == [400], responses
    assert upstream.received_bytes() == received


@SHARED
@pytest.mark.parametrize(
    ("request_line", "host_lines"),
    [
        ("GET /x HTTP/1.1", ["Host: evil.example"]),
        ("GET /x HTTP/1.1", ["Host: evil.example:8443"]),
        ("GET /x HTTP/1.1", ["Host: [::1]:8080"]),
        ("GET /x HTTP/1.1", ["Host: 10.0.0.1"]),
        ("GET /x HTTP/1.0", []),
        ("GET //evil.example/x HTTP/1.1", ["Host: t"]),
    ],
)
async def test_any_host_or_target_still_reaches_only_the_configured_upstream(
    request_line: str, host_lines: list[str], shared: Shared
) -> None:
    running, upstream = shared
    since = len(upstream.arrivals)
    responses = await exchange(running.url, head(request_line, *host_lines))
    assert responses[0][0] == 200 and responses[0][1]["x-upstream"] == "raw"
    forwarded = upstream.arrivals[since]
    assert forwarded.target == request_line.split(" ")[1].encode()
    assert forwarded.header(b"host") == [f"127.0.0.1:{upstream.port}".encode()]


PATH_ATTACKS = [
    "/public/../admin",
    "/public/./x",
    "/public/%2e%2e/admin",
    "/public/%2E%2E/admin",
    "/public/%2E./admin",
    "/public/.%2e/admin",
    "/public/%2e/admin",
    "/public/%252e%252e/admin",
    "/public/%25252e%25252e/admin",
    "/public%2F..%2Fadmin",
    "/public%2fadmin",
    "/public/..%2Fadmin",
    "/public/..%2fadmin",
    "/public/..%5Cadmin",
    "/public/%5C..%5Cadmin",
    "/public/..%255Cadmin",
    "/public/..\\admin",
    "/public\\..\\admin",
    "/public/..;/admin",
    "/public/%2e%2e;x=1/admin",
    "/public/.;/admin",
    "/public/a%2Fb",
]


@asynccontextmanager
async def based_proxy(**limits: Any) -> AsyncIterator[tuple[RunningRelay, RecordingUpstream]]:
    upstream = RecordingUpstream()
    async with upstream.running():
        config = {
            "upstreams": {"up": {"url": f"{upstream.url}/base"}},
            "routes": [{"prefix": "/public", "upstream": "up", "strip_prefix": True}],
            "limits": limits,
        }
        async with run_relay(config) as running:
            yield running, upstream


@SHARED
@pytest.mark.parametrize("target", PATH_ATTACKS)
async def test_paths_that_could_leave_the_route_are_refused(
    target: str, shared_based: Shared
) -> None:
    running, upstream = shared_based
    responses = await exchange(running.url, head(f"GET {target} HTTP/1.1", HOST))
    assert [r[0] for r in responses] == [400], responses
    assert responses[0][1]["proxy-status"] == "relay; error=http_request_error"
    assert upstream.connections == []


@SHARED
@pytest.mark.parametrize(
    ("target", "status", "forwarded"),
    [
        ("/public/a%2Fb", 200, b"/base/a%2Fb"),  # forwarded as sent
        ("/public/a%5Cb%2fc", 200, b"/base/a%5Cb%2fc"),
        ("/public/%252F", 200, b"/base/%252F"),
        ("/public%2Fadmin", 404, None),  # one segment "public%2Fadmin": not the route
        ("/public/..%2Fadmin", 400, None),  # a dot segment once the slash is decoded
        ("/public/a%2F..%2F..%2Fadmin", 400, None),
        ("/public/..%5Cadmin", 400, None),
        ("/public/%2e%2e", 400, None),
    ],
)
async def test_allowed_encoded_slashes_stay_data(
    target: str, status: int, forwarded: bytes | None, shared_slashes: Shared
) -> None:
    running, upstream = shared_slashes
    since = len(upstream.arrivals)
    responses = await exchange(running.url, head(f"GET {target} HTTP/1.1", HOST))
    assert responses[0][0] == status, responses
    new = [r.target for r in upstream.arrivals[since:]]
    assert new[:1] == ([forwarded] if forwarded else [])


def test_path_policy() -> None:
    ok = [b"/", b"/a/b", b"//a", b"/.well-known/x", b"/..a/b..", b"/a%20b", b"/a;p=1", b"/%41"]
    for path in ok:
        assert path_problem(path, allow_encoded_slashes=False) is None, path
    for target in PATH_ATTACKS:
        assert path_problem(target.encode(), allow_encoded_slashes=False) is not None, target
    assert path_problem(b"/a%2Fb", allow_encoded_slashes=True) is None
    assert path_problem(b"/a%2F..%2Fb", allow_encoded_slashes=True) == "dot segment in path"
    assert routing_path(b"/caf%C3%A9/a%2Fb%5c/%252F") == "/café/a%2Fb%5C/%2F"


# -- limits -------------------------------------------------------------------------------


def refused(responses: list[Response], status: int, limit: str) -> None:
    assert [r[0] for r in responses] == [status], responses
    _, headers, body = responses[0]
    assert headers["connection"] == "close"
    assert headers["proxy-status"].startswith("relay; error=http_request_denied")
    assert limit.encode() in body, body


async def test_request_target_limit() -> None:
    async with proxy(limits={"max_request_target_bytes": 1000}) as (running, upstream):
        at_limit = "/" + "a" * 999
        responses = await exchange(running.url, head(f"GET {at_limit} HTTP/1.1", HOST))
        assert responses[0][0] == 200
        over = "/" + "a" * 1000
        responses = await exchange(running.url, head(f"GET {over} HTTP/1.1", HOST))
        refused(responses, 414, "limits.max_request_target_bytes")
        assert [r.target for r in upstream.requests] == [at_limit.encode(), b"/sentinel"]
        assert await metric(running, "relay_requests_total", upstream="-", code="414") == 1


async def test_header_count_limit() -> None:
    async with proxy(limits={"max_header_count": 10}) as (running, upstream):
        fields = [f"x-{i}: v" for i in range(9)]
        responses = await exchange(running.url, head("GET / HTTP/1.1", HOST, *fields))
        assert responses[0][0] == 200
        fields.append("x-9: v")
        responses = await exchange(running.url, head("GET / HTTP/1.1", HOST, *fields))
        refused(responses, 431, "limits.max_header_count")
        assert len(upstream.requests) == 2  # the first and its sentinel


async def test_header_bytes_limit() -> None:
    async with proxy(limits={"max_header_bytes": 1000}) as (running, upstream):
        # "host" + "t" + "x" + 994 bytes of value: exactly 1000.
        responses = await exchange(running.url, head("GET / HTTP/1.1", HOST, "x: " + "v" * 994))
        assert responses[0][0] == 200
        responses = await exchange(running.url, head("GET / HTTP/1.1", HOST, "x: " + "v" * 995))
        refused(responses, 431, "limits.max_header_bytes")
        assert len(upstream.requests) == 2


@pytest.mark.parametrize(
    "prefix", [b"GET / HTTP/1.1\r\nHost: t\r\nx-endless: ", b"GET /", b"GET / HTTP/1.1\r\nx"]
)
async def test_an_endless_head_is_refused_while_it_arrives(prefix: bytes) -> None:
    """A header value (or target, or name) that never ends: refused once the limits are
    passed, long before the client stops sending, so memory stays bounded."""
    async with proxy() as (running, upstream):
        reader, writer = await connect(running.url)
        writer.write(prefix)
        sent = len(prefix)
        piece = b"a" * 16384
        response = None
        read = asyncio.ensure_future(read_response(reader))
        try:
            while sent < 8 * 1024 * 1024 and not read.done():
                writer.write(piece)
                await writer.drain()
                sent += len(piece)
                await asyncio.sleep(0.002)
            async with asyncio.timeout(10):
                response = await read
        except ConnectionError:
            async with asyncio.timeout(10):
                response = await read
        finally:
            read.cancel()
            writer.close()
        assert response is not None, f"no answer after {sent} bytes"
        assert response[0] in (414, 431), response
        # Default limits: 8 KiB target + 64 KiB fields, refused well before 8 MiB arrived.
        assert sent < 2 * 1024 * 1024, sent
        assert upstream.connections == []


async def test_body_limit_by_content_length_is_checked_before_any_upstream_contact() -> None:
    async with proxy(limits={"max_body_bytes": 1000}) as (running, upstream):
        ok = head(POST, HOST, "Content-Length: 1000", body=b"x" * 1000)
        assert (await exchange(running.url, ok))[0][0] == 200
        # Announced over the limit: refused at once, even without sending the body (and
        # without a 100 Continue for a client that waits for one).
        over = head(POST, HOST, "Content-Length: 1001", "Expect: 100-continue")
        refused(await exchange(running.url, over), 413, "limits.max_body_bytes")
        assert [r.target for r in upstream.requests] == [b"/", b"/sentinel"]
        assert await metric(running, "relay_requests_total", upstream="-", code="413") == 1


async def test_chunked_body_over_the_limit_aborts_the_upstream_request() -> None:
    async with proxy(limits={"max_body_bytes": 1000}) as (running, upstream):
        ok = chunked_post(chunked(b"x" * 600, b"y" * 400))
        assert (await exchange(running.url, ok))[0][0] == 200
        reader, writer = await connect(running.url)
        writer.write(chunked_post(b"258\r\n" + b"x" * 600))
        await writer.drain()
        for _ in range(250):
            if len(upstream.connections) == 2 or any(
                c.partial is not None for c in upstream.connections
            ):
                break
            await asyncio.sleep(0.02)
        writer.write(b"\r\n258\r\n" + b"y" * 600 + b"\r\n0\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            response = await read_response(reader)
            assert await reader.read() == b""
        writer.close()
        assert response is not None
        refused([response], 413, "limits.max_body_bytes")
        assert response[1]["proxy-status"] == 'relay; error=http_request_denied; next-hop="up"'
        assert upstream.problems() == []
        # The one complete request upstream is the first; the second never completed.
        assert [(r.target, len(r.body)) for r in upstream.requests] == [
            (b"/", 1000),
            (b"/sentinel", 0),
        ]
        assert await metric(running, "relay_requests_total", upstream="up", code="413") == 1
        assert await metric(running, "relay_upstream_errors_total", upstream="up") == 0


async def test_refusals_are_logged_like_other_exchanges(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logging.getLogger("relay.access"), "disabled", False)
    caplog.set_level(logging.INFO, logger="relay.access")
    async with proxy(limits={"max_request_target_bytes": 100}) as (running, _):
        await exchange(running.url, head("GET /" + "a" * 200 + " HTTP/1.1", HOST))
        await exchange(running.url, head(POST, HOST, "Content-Length: 1", "Content-Length: 2"))
    lines = [r for r in caplog.records if r.name == "relay.access"]
    assert [(r.status, r.reason, r.method, r.upstream) for r in lines] == [  # type: ignore[attr-defined]
        (414, "uri_too_long", "GET", None),
        (400, "bad_request", "POST", None),
    ]
    assert lines[0].path == "/" + "a" * 200  # type: ignore[attr-defined]


async def test_head_request_refusal_has_no_body() -> None:
    async with proxy(limits={"max_request_target_bytes": 100}) as (running, _):
        reader, writer = await connect(running.url)
        writer.write(head("HEAD /" + "a" * 200 + " HTTP/1.1", HOST))
        async with asyncio.timeout(10):
            raw = await reader.read()
        writer.close()
        assert raw.startswith(b"HTTP/1.1 414 ")
        assert raw.endswith(b"\r\n\r\n")


# -- forwarding headers and admin paths ---------------------------------------------------

SPOOFED = [
    "X-Forwarded-For: 6.6.6.6",
    "X-Forwarded-Proto: https",
    "X-Forwarded-Host: evil.example",
    "X-Forwarded-Port: 443",
    "X-Forwarded-Prefix: /admin",
    "Forwarded: for=6.6.6.6;proto=https;host=evil.example",
    "X-Real-IP: 6.6.6.6",
    "X-Original-URL: /admin",
    "X-Rewrite-URL: /admin",
    "True-Client-IP: 6.6.6.6",
    "X-Client-IP: 6.6.6.6",
]


@SHARED
async def test_spoofed_forwarding_headers_from_untrusted_peers_are_dropped(
    shared: Shared,
) -> None:
    running, upstream = shared
    since = len(upstream.arrivals)
    await exchange(running.url, head("GET / HTTP/1.1", "Host: edge.example", *SPOOFED))
    seen = dict(upstream.arrivals[since].headers)
    assert seen[b"x-forwarded-for"] == b"127.0.0.1"
    assert seen[b"x-forwarded-proto"] == b"http"
    assert seen[b"x-forwarded-host"] == b"edge.example"
    for name in (b"forwarded", *CLAIMED_NAMES):
        assert name not in seen, name


async def test_forwarding_headers_from_trusted_peers_are_kept_and_appended_to() -> None:
    async with proxy(server={"trusted_proxies": ["127.0.0.0/8"]}) as (running, upstream):
        await exchange(running.url, head("GET / HTTP/1.1", "Host: edge.example", *SPOOFED))
        seen = upstream.requests[0]
        assert seen.header(b"x-forwarded-for") == [b"6.6.6.6, 127.0.0.1"]
        assert seen.header(b"x-real-ip") == [b"6.6.6.6"]
        assert seen.header(b"x-original-url") == [b"/admin"]
        assert seen.header(b"forwarded") == [
            b"for=6.6.6.6;proto=https;host=evil.example, "
            b'for=127.0.0.1;proto=http;host="edge.example"'
        ]


def test_forwarded_element_quotes_ipv6_and_hosts() -> None:
    ctx = RequestContext("2001:db8::1", "https", "1.1", b"edge.example:8443")
    out = upstream_request_headers(
        [(b"forwarded", b"for=192.0.2.1"), (b"x-real-ip", b"192.0.2.1")],
        ctx,
        upstream_authority=b"up:80",
        preserve_host=False,
        via_name=b"relay",
        trusted=[ipaddress.ip_network("2001:db8::/32")],
    )
    assert (
        b"forwarded",
        b'for=192.0.2.1, for="[2001:db8::1]";proto=https;host="edge.example:8443"',
    ) in out
    assert (b"x-real-ip", b"192.0.2.1") in out


def test_head_problems() -> None:
    def problem(*fields: tuple[bytes, bytes], version: str = "1.1") -> str | None:
        return head_problem(list(fields), version)

    host = (b"host", b"t")
    assert problem(host) is None
    assert problem(version="1.0") is None
    assert problem() == "no Host"
    assert problem(host, host) == "more than one Host"
    assert problem((b"host", b"a@b")) == "invalid Host"
    assert problem(host, (b"content-length", b"1"), (b"content-length", b"1")) is not None
    te = (b"transfer-encoding", b"chunked")
    assert problem(host, te) is None
    assert problem(host, te, version="1.0") == "Transfer-Encoding outside HTTP/1.1"
    assert problem(host, (b"transfer-encoding", b"gzip, chunked")) is not None
    assert problem(host, te, (b"content-length", b"0")) is not None


@SHARED
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_admin_paths_on_the_proxy_port_go_upstream(path: str, shared: Shared) -> None:
    running, upstream = shared
    since = len(upstream.arrivals)
    responses = await exchange(running.url, head(f"GET {path} HTTP/1.1", HOST))
    assert responses[0][0] == 200 and responses[0][1]["x-upstream"] == "raw"
    assert responses[0][2] == f"GET {path} 0".encode()
    assert upstream.arrivals[since].target == path.encode()


@SHARED
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_admin_paths_on_the_proxy_port_without_a_route_are_404(
    path: str, shared_based: Shared
) -> None:
    running, upstream = shared_based
    responses = await exchange(running.url, head(f"GET {path} HTTP/1.1", HOST))
    status, headers, body = responses[0]
    assert status == 404
    assert headers["proxy-status"] == "relay; error=destination_not_found"
    assert b"relay_requests_total" not in body
    assert upstream.connections == []


# -- connections between requests -----------------------------------------------------------


async def test_a_head_that_stops_arriving_is_answered_408_and_closed() -> None:
    """Slowloris: part of a head, then nothing. Answered once the head timeout has passed
    since its first byte, even though bytes kept trickling in; counted, never forwarded."""
    async with proxy(server={"request_head_timeout_seconds": 0.5}) as (running, upstream):
        reader, writer = await connect(running.url)
        loop = asyncio.get_running_loop()
        started = loop.time()
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
        for _ in range(3):  # a trickle keeps no head alive past its deadline
            await asyncio.sleep(0.1)
            writer.write(b"x-slow: 1\r\n")
        response = await asyncio.wait_for(read_response(reader), 10)
        assert loop.time() - started >= 0.5
        assert response is not None
        status, headers, _ = response
        assert status == 408
        assert headers["connection"] == "close"
        assert headers["proxy-status"].startswith("relay; error=http_request_error")
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed
        writer.close()
        assert upstream.requests == []
        assert await metric(running, "relay_requests_total", upstream="-", code="408") == 1


async def test_a_head_within_the_timeout_on_a_kept_alive_connection_is_served() -> None:
    """The deadline runs from each request's first byte, not from the connection's start."""
    async with proxy(server={"request_head_timeout_seconds": 0.6}) as (running, upstream):
        reader, writer = await connect(running.url)
        for _ in range(3):
            writer.write(b"GET / HTTP/1.1\r\n")
            await asyncio.sleep(0.3)
            writer.write(b"Host: t\r\n\r\n")
            response = await asyncio.wait_for(read_response(reader), 10)
            assert response is not None and response[0] == 200
        writer.close()
        assert len(upstream.requests) == 3


async def test_a_new_connection_that_sends_nothing_is_closed_after_the_idle_timeout() -> None:
    async with proxy(server={"keepalive_timeout_seconds": 0.3}) as (running, _):
        reader, writer = await connect(running.url)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed, nothing written
        writer.close()
        # A connection that did send its request in time is served as ever.
        responses = await exchange(running.url, head("GET / HTTP/1.1", HOST))
        assert responses[0][0] == 200
