"""Upstream faults map to the right status and Proxy-Status, over real sockets."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from tests.harness import (
    Request,
    ScriptedUpstream,
    Writer,
    closed_port,
    delayed,
    eventually,
    reset_mid_body,
    respond,
    run_relay,
)

pytestmark = pytest.mark.usefixtures("no_error_logs")


async def garbage(request: Request, writer: Writer) -> None:
    writer.write(b"SPDY/9 banana\r\n\r\n")
    await writer.drain()
    writer.close()


async def close_at_once(request: Request, writer: Writer) -> None:
    writer.close()


async def stall_mid_body(request: Request, writer: Writer) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1000\r\n\r\n" + b"z" * 100)
    await writer.drain()
    await asyncio.sleep(3)


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose accept queue is full: new connections hang in SYN-SENT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for filler in fillers:
            filler.close()
        server.close()


def config_for(url: str, transport: str, **upstream: Any) -> dict[str, Any]:
    return {
        "upstreams": {"up": {"url": url, "transport": transport, **upstream}},
        "routes": [{"prefix": "/", "upstream": "up"}],
    }


async def get(url: str, **kwargs: Any) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(url, **kwargs)


def assert_proxy_error(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["proxy-status"] == f'relay; error={error}; next-hop="up"'
    assert response.headers["content-type"].startswith("text/plain")


async def test_connection_refused_is_502(transport: str) -> None:
    async with run_relay(config_for(f"http://127.0.0.1:{closed_port()}", transport)) as relay:
        assert_proxy_error(await get(f"{relay.url}/x"), 502, "connection_refused")


async def test_connect_timeout_is_504(transport: str) -> None:
    with unaccepting_listener() as port:
        config = config_for(f"http://127.0.0.1:{port}", transport, timeouts={"connect": 0.3})
        async with run_relay(config) as relay:
            assert_proxy_error(await get(f"{relay.url}/x"), 504, "connection_timeout")


@pytest.mark.parametrize(
    ("handler", "error"),
    [(garbage, "http_protocol_error"), (close_at_once, "connection_terminated")],
)
async def test_bad_upstream_answers_are_502(transport: str, handler: Any, error: str) -> None:
    upstream = ScriptedUpstream({"/x": handler})
    async with upstream.running(), run_relay(config_for(upstream.url, transport)) as relay:
        assert_proxy_error(await get(f"{relay.url}/x"), 502, error)
    assert len(upstream.seen) == 1  # a fresh connection is never retried


async def test_read_timeout_before_headers_is_504(transport: str) -> None:
    upstream = ScriptedUpstream({"/slow": delayed(2, respond(200, b"late"))})
    async with (
        upstream.running(),
        run_relay(config_for(upstream.url, transport, timeouts={"read": 0.3})) as relay,
    ):
        started = asyncio.get_running_loop().time()
        response = await get(f"{relay.url}/slow")
        elapsed = asyncio.get_running_loop().time() - started
    assert_proxy_error(response, 504, "connection_read_timeout")
    assert 0.25 < elapsed < 1.5


async def test_write_timeout_when_upstream_stops_reading_is_504(transport: str) -> None:
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()
        writer.close()

    server = await asyncio.start_server(never_reads, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = config_for(f"http://127.0.0.1:{port}", transport, timeouts={"write": 0.5, "read": 30})

    async def body() -> AsyncIterator[bytes]:
        for _ in range(256):
            yield b"w" * (1 << 20)

    try:
        async with run_relay(config) as relay, httpx.AsyncClient(timeout=10) as client:
            try:
                response = await client.post(f"{relay.url}/upload", content=body())
            except httpx.HTTPError:
                response = None
            await eventually(lambda: relay.relay.upstreams()["up"].snapshot().in_use == 0, within=5)
            metrics = (await client.get(f"{relay.admin_url}/metrics")).text
    finally:
        stop.set()
        server.close()
        await server.wait_closed()
    if response is not None:
        assert_proxy_error(response, 504, "connection_write_timeout")
    assert 'relay_upstream_errors_total{reason="write_timeout",upstream="up"} 1.0' in metrics


async def test_pool_exhausted_is_503_with_retry_after(transport: str) -> None:
    upstream = ScriptedUpstream({"/slow": delayed(1, respond(200, b"ok"))})
    pool = {"max_connections": 1, "max_keepalive_connections": 1}
    async with (
        upstream.running(),
        run_relay(config_for(upstream.url, transport, pool=pool, timeouts={"pool": 0.2})) as relay,
    ):
        holder = asyncio.create_task(get(f"{relay.url}/slow"))
        await eventually(lambda: relay.relay.upstreams()["up"].snapshot().in_use == 1)
        response = await get(f"{relay.url}/slow")
        assert (await holder).status_code == 200
    assert_proxy_error(response, 503, "connection_limit_reached")
    assert response.headers["retry-after"] == "1"


@pytest.mark.parametrize("handler", [reset_mid_body, stall_mid_body])
async def test_failure_after_headers_truncates_the_response(transport: str, handler: Any) -> None:
    upstream = ScriptedUpstream({"/x": handler})
    async with (
        upstream.running(),
        run_relay(config_for(upstream.url, transport, timeouts={"read": 0.5})) as relay,
    ):
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream("GET", f"{relay.url}/x") as response,
        ):
            assert response.status_code == 200
            with pytest.raises(httpx.RemoteProtocolError):
                await response.aread()
        await eventually(lambda: relay.relay.upstreams()["up"].snapshot().in_use == 0)
