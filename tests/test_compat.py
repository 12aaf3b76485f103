"""Canary: every private name of aiohttp, httpx/httpcore, uvicorn and prometheus-client that
Relay relies on exists on the installed versions, and pyproject.toml's bounds hold what
constraints.txt pins.

An upgrade that renames one fails here, naming it, instead of silently switching a
protection off (service/compat.py). Names set per instance are checked on real instances:
a pool that made a real request, a server that parsed a real one.
"""

from __future__ import annotations

import asyncio
import tomllib
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import pytest
import uvicorn
from aiohttp.client_proto import ResponseHandler
from packaging.requirements import Requirement
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from service.compat import IncompatibleLibrary, missing, require
from service.server import uvicorn_compat
from service.telemetry import prometheus_compat
from service.upstreams import aiohttp_compat, httpcore_compat
from service.upstreams.aiohttp_pool import AiohttpTransport
from service.upstreams.httpcore_compat import h11_state_of, pool_connections
from service.upstreams.httpcore_pool import HttpcoreTransport
from service.upstreams.tls import TlsSettings, tls_context
from tests.support.net import eventually
from tests.support.scripted import ScriptedUpstream, respond

PLAIN = tls_context(TlsSettings(verify=False))

ROOT = Path(__file__).resolve().parent.parent
PINNED = ("aiohttp", "httpx", "httpcore", "uvicorn", "prometheus-client")


def test_every_private_name_read_from_a_class_exists() -> None:
    for module in (aiohttp_compat, httpcore_compat, uvicorn_compat, prometheus_compat):
        assert missing(module.CLASS_NAMES) == [], module.__name__
    assert "_retry_connection" in aiohttp.ClientSession.ATTRS


def test_a_missing_name_fails_naming_it() -> None:
    with pytest.raises(IncompatibleLibrary, match=r"aiohttp 3\.\S+ lacks TCPConnector\._nope"):
        require("aiohttp", {aiohttp.TCPConnector: ("_get", "_nope")})


def test_a_broken_response_chain_fails_instead_of_passing_the_check_by() -> None:
    with pytest.raises(IncompatibleLibrary, match=r"ByteStream\._httpcore_stream"):
        h11_state_of(httpx.ByteStream(b"not from httpcore"))


async def test_aiohttp_instance_names_on_a_pool_that_made_a_request() -> None:
    for owner in (aiohttp.TCPConnector, aiohttp.ClientSession):
        assert owner in aiohttp_compat.INSTANCE_NAMES
    handler = ResponseHandler(asyncio.get_running_loop())
    assert all(hasattr(handler, n) for n in aiohttp_compat.INSTANCE_NAMES[ResponseHandler])
    upstream = ScriptedUpstream({"/": respond(200, b"ok")})
    async with upstream.running():
        transport = AiohttpTransport(limits=httpx.Limits(max_connections=2), tls=PLAIN)
        async with transport:
            assert transport._session is None  # opened by the first request
            response = await transport.handle_async_request(
                httpx.Request("GET", f"{upstream.url}/")
            )
            session = transport._session
            assert session is not None and session._retry_connection is False
            targets = {aiohttp.TCPConnector: session.connector, aiohttp.ClientSession: session}
            for owner, target in targets.items():
                names = aiohttp_compat.INSTANCE_NAMES[owner]
                assert [n for n in names if not hasattr(target, n)] == [], owner
            assert [chunk async for chunk in response.stream] == [b"ok"]
            await response.aclose()
            assert transport.idle_connections() == 1  # read through TCPConnector._conns


async def test_httpcore_chain_on_a_real_response() -> None:
    upstream = ScriptedUpstream({"/": respond(200, b"ok")})
    transport = HttpcoreTransport(tls=PLAIN, trust_env=False)
    async with upstream.running(), transport:
        response = await transport.handle_async_request(httpx.Request("GET", f"{upstream.url}/"))
        assert isinstance(response.stream, httpx.AsyncByteStream)
        inner = response.stream._inner  # type: ignore[attr-defined]
        parser = h11_state_of(inner)
        assert parser.trailing_data == (b"ok", False)  # the body, not read yet
        assert await response.aread() == b"ok"
        await response.aclose()
        assert parser.trailing_data == (b"", False)
        assert len(pool_connections(transport)) == 1
        assert transport.idle_connections() == 1


class _Recording(HttpToolsProtocol):
    seen: list[Any] = []

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self.seen.append((self, self.cycle))


async def test_uvicorn_instance_names_on_a_server_that_parsed_a_request() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(app, log_config=None, lifespan="off")
    config.load()
    state = ServerState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Recording(config, state, {}), "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 204")
    finally:
        server.close()
        await server.wait_closed()
    ((protocol, cycle),) = _Recording.seen
    checks = {HttpToolsProtocol: protocol, type(cycle): cycle}
    for owner, target in checks.items():
        names = uvicorn_compat.INSTANCE_NAMES[owner]
        assert [n for n in names if not hasattr(target, n)] == [], owner


async def test_uvicorn_server_names_on_a_started_server() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="off")
    config.load()
    server = uvicorn_compat.UvicornServer(config)  # uvicorn's, minus its signal handlers
    serving = asyncio.ensure_future(server.serve())
    try:
        await eventually(lambda: server.started or serving.done(), within=10)
        assert server.started
        checks = {uvicorn.Server: server, ServerState: server.server_state}
        for owner, target in checks.items():
            names = uvicorn_compat.INSTANCE_NAMES[owner]
            assert [n for n in names if not hasattr(target, n)] == [], owner
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


def test_bounds_hold_the_pinned_and_installed_versions() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    pins = dict(
        line.replace("_", "-").split("==", 1)
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )
    for name in PINNED:
        specifier = requirements[name].specifier
        assert any(s.operator == "<" for s in specifier), f"{name} has no upper bound"
        assert specifier.contains(pins[name]), f"constraints.txt pins {name} {pins[name]}"
        assert specifier.contains(version(name)), f"installed {name} {version(name)}"


async def test_uvicorn_websocket_protocol_names_on_a_real_instance() -> None:
    config = uvicorn.Config(lambda *_: None, log_config=None, lifespan="off")
    config.load()
    protocol = uvicorn_compat.DrainSafeWebSocket(config, ServerState(), {})
    names = uvicorn_compat.INSTANCE_NAMES[uvicorn_compat.WebSocketsSansIOProtocol]
    assert [n for n in names if not hasattr(protocol, n)] == []
