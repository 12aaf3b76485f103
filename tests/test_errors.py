"""Upstream faults map to the right status and Proxy-Status, over real sockets, for both
transports; faults after the headers truncate the response instead."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support.http import http_client
from tests.support.metrics import exposition_async
from tests.support.net import closed_port, eventually, unaccepting_listener
from tests.support.relays import StartRelay, one_upstream, pool_settled, run_relay
from tests.support.scripted import (
    Request,
    ScriptedUpstream,
    Writer,
    delayed,
    hang,
    reset_mid_body,
    respond,
    send_raw,
)
from tests.support.wire import raw_exchange

pytestmark = pytest.mark.usefixtures("no_error_logs")

# Answered by the proxy, not cut by the client's own 10 s timeout: far below that, with room
# for a loaded 2-core machine.
PROMPT = 5


async def close_at_once(request: Request, writer: Writer) -> None:
    writer.close()


async def stall_mid_body(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"z" * 100)
    await writer.drain()
    await asyncio.sleep(5)


async def bad_chunk_mid_body(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await writer.drain()
    await asyncio.sleep(0.05)
    writer.write(b"this is not a chunk size\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(5)  # keep the connection open: only the parse error can end it


async def timed_get(url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    async with http_client(timeout=10) as client:
        response = await client.get(url, **kwargs)
    return response, time.monotonic() - started


def assert_proxy_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["proxy-status"] == f'relay; error={error}; next-hop="up"'
    assert response.headers["content-type"].startswith("text/plain")
    assert response.headers["cache-control"] == "no-store"
    assert "retry-after" not in response.headers or status == 503


async def test_connection_refused_is_502(relay_to: StartRelay) -> None:
    relay = await relay_to(f"http://127.0.0.1:{closed_port()}")
    response, elapsed = await timed_get(f"{relay.url}/x")
    assert_proxy_error(response, 502, "connection_refused")
    assert elapsed < PROMPT
    assert pool_settled(relay)


async def test_connect_timeout_is_504(transport: str) -> None:
    with unaccepting_listener() as port:
        config = one_upstream(f"http://127.0.0.1:{port}", transport, timeouts={"connect": 0.3})
        async with run_relay(config) as relay:
            response, elapsed = await timed_get(f"{relay.url}/x")
            assert pool_settled(relay)
    assert_proxy_error(response, 504, "connection_timeout")
    assert 0.25 < elapsed < PROMPT


@pytest.mark.parametrize(
    ("handler", "error"),
    [
        (send_raw(b"SPDY/9 banana\r\n\r\n"), "http_protocol_error"),
        (send_raw(b"HTTP/1.1 200 OK\r\nbroken header line\r\n\r\n"), "http_protocol_error"),
        (send_raw(b"HTTP/1.1 600 Weird\r\ncontent-length: 0\r\n\r\n"), "http_protocol_error"),
        (send_raw(b"HTTP/1.1 101 Switching Protocols\r\n\r\n"), "http_protocol_error"),
        (close_at_once, "connection_terminated"),
    ],
    ids=["garbage-status-line", "garbage-header", "status-600", "unasked-101", "closed"],
)
async def test_bad_upstream_answers_are_502(
    upstream: ScriptedUpstream, relay_to: StartRelay, handler: Any, error: str
) -> None:
    upstream.handlers["/x"] = handler
    relay = await relay_to(upstream.url)
    response, elapsed = await timed_get(f"{relay.url}/x")
    await eventually(lambda: pool_settled(relay))
    assert_proxy_error(response, 502, error)
    assert elapsed < PROMPT
    assert len(upstream.seen) == 1  # a fresh connection is never retried


async def test_read_timeout_before_headers_is_504(
    upstream: ScriptedUpstream, relay_to: StartRelay
) -> None:
    upstream.handlers |= {"/slow": delayed(1, respond(200, b"late")), "/hang": hang}
    relay = await relay_to(upstream.url, timeouts={"read": 0.4})
    for path in ("/slow", "/hang"):
        response, elapsed = await timed_get(f"{relay.url}{path}")
        assert_proxy_error(response, 504, "connection_read_timeout")
        assert 0.35 < elapsed < PROMPT, elapsed
    await eventually(lambda: pool_settled(relay))
    # The timed-out connections were closed, never handed to the next request.
    await eventually(lambda: upstream.closed_connections == 2)


async def test_write_timeout_when_upstream_stops_reading_is_504(transport: str) -> None:
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = one_upstream(f"http://127.0.0.1:{port}", transport, timeouts={"write": 0.5})

    async def body() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"w" * (1 << 20)

    try:
        async with run_relay(config) as relay, http_client(timeout=10) as client:
            try:
                response: httpx.Response | None = await client.post(
                    f"{relay.url}/upload", content=body()
                )
            except httpx.HTTPError:
                response = None  # the proxy answered before reading the whole body
            await eventually(lambda: pool_settled(relay))
            metrics = await exposition_async(relay.admin_url)
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
    if response is not None:
        assert_proxy_error(response, 504, "connection_write_timeout")
    assert 'relay_upstream_errors_total{reason="write_timeout",upstream="up"} 1.0' in metrics


async def test_pool_exhausted_is_503_with_retry_after(transport: str) -> None:
    upstream = ScriptedUpstream({"/slow": delayed(3, respond(200, b"ok"))})
    pool = {"max_connections": 1, "max_keepalive_connections": 1}
    async with upstream.running():
        config = one_upstream(upstream.url, transport, pool=pool, timeouts={"pool": 0.3})
        config["server"] = {"retry_after_seconds": 7}
        async with run_relay(config) as relay:
            holder = asyncio.create_task(timed_get(f"{relay.url}/slow"))
            await eventually(lambda: relay.relay.upstreams()["up"].snapshot().in_use == 1)
            response, elapsed = await timed_get(f"{relay.url}/slow")
            held, _ = await holder
            assert held.status_code == 200
            await eventually(lambda: pool_settled(relay))
    assert_proxy_error(response, 503, "connection_limit_reached")
    assert response.headers["retry-after"] == "7"
    assert 0.25 < elapsed < PROMPT
    assert len(upstream.seen) == 1  # the refused request never reached the upstream


@pytest.mark.parametrize(
    ("handler", "sent"),
    [(reset_mid_body, b"y" * 10), (stall_mid_body, b"z" * 100), (bad_chunk_mid_body, b"hello")],
    ids=["reset", "read-timeout", "bad-chunk"],
)
async def test_failure_after_headers_truncates_the_response(
    upstream: ScriptedUpstream, relay_to: StartRelay, handler: Any, sent: bytes
) -> None:
    upstream.handlers["/x"] = handler
    relay = await relay_to(upstream.url, timeouts={"read": 0.5})
    received = b""
    started = time.monotonic()
    async with (
        http_client(timeout=10) as client,
        client.stream("GET", f"{relay.url}/x") as response,
    ):
        assert response.status_code == 200
        with pytest.raises(httpx.RemoteProtocolError):
            async for chunk in response.aiter_raw():
                received += chunk
        # Cut promptly by the proxy (not by the client's own 10 s timeout), and the pool
        # slot is free while this client is still connected.
        assert time.monotonic() - started < PROMPT
        await eventually(lambda: pool_settled(relay))
    assert received == sent


def _head_and_body(raw: bytes) -> tuple[str, list[str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    return status_line, [field.split(":", 1)[0].lower() for field in fields], body


async def test_the_guard_and_the_proxy_answer_errors_alike() -> None:
    """One error answer, whichever path writes it: a request the parse-time guard refuses
    (raw bytes, before any application) and one the proxy answers (no route, through ASGI)
    carry the same fields in the same order and the same kind of body."""
    config = {
        **one_upstream("http://127.0.0.1:9"),
        "routes": [{"prefix": "/api", "upstream": "up"}],
    }
    async with run_relay(config) as relay:
        refused = await raw_exchange(
            relay.url, b"GET /api/../x HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
        unrouted = await raw_exchange(
            relay.url, b"GET /other HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n"
        )
    guard_status, guard_fields, guard_body = _head_and_body(refused)
    proxy_status, proxy_fields, proxy_body = _head_and_body(unrouted)
    assert guard_status == "HTTP/1.1 400 Bad Request"
    assert guard_body == b"400 Bad Request: malformed request (dot segment in path)\n"
    assert proxy_status == "HTTP/1.1 404 Not Found"
    assert proxy_body == b"404 Not Found: no route for this request\n"
    shared = ["content-type", "content-length", "proxy-status", "cache-control", "date"]
    assert guard_fields == [*shared, "connection", "x-request-id"]
    # uvicorn adds its own "connection: close" when the client asked for it.
    assert [f for f in proxy_fields if f != "connection"] == [*shared, "x-request-id"]
