"""Real servers for tests: the proxy in-process on ephemeral ports, and scripted upstreams.

The scripted upstream speaks HTTP/1.1 by hand over asyncio streams so that it can misbehave
exactly on cue (stall, reset mid-body, never answer) and report what it saw.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from service.app import Relay
from service.config import Settings
from service.server.listeners import Listeners
from service.server.serve import Service
from service.telemetry.tracing import Tracing


def bind_local() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def unaccepting_listener() -> Iterator[int]:
    """A port whose accept queue is full: new connections hang in SYN-SENT."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = int(server.getsockname()[1])
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


@dataclass
class RunningRelay:
    url: str
    admin_url: str
    relay: Relay
    service: Service


@asynccontextmanager
async def run_relay(
    config: dict[str, Any], *, tracing: Tracing | None = None
) -> AsyncIterator[RunningRelay]:
    server = {"drain_delay_seconds": 0, "grace_period_seconds": 2, **config.get("server", {})}
    settings = Settings(**{**config, "server": server})
    proxy_sock, admin_sock = bind_local(), bind_local()
    relay = Relay(settings, tracing=tracing)
    service = Service(settings, relay)
    task = asyncio.create_task(service.serve(Listeners(proxy_sock, admin_sock, None)))
    try:
        for _ in range(500):
            if relay.health.ready or task.done():
                break
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
        assert relay.health.ready, "relay did not become ready"
        yield RunningRelay(
            url=f"http://127.0.0.1:{port_of(proxy_sock)}",
            admin_url=f"http://127.0.0.1:{port_of(admin_sock)}",
            relay=relay,
            service=service,
        )
    finally:
        service.request_shutdown()
        await asyncio.wait_for(task, 15)


StartRelay = Callable[..., Awaitable[RunningRelay]]
"""What the ``relay_to`` fixture gives: start a relay in front of one upstream URL."""


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader | None = None
    sequence: int = 0  # how many requests this connection carried before this one


Writer = asyncio.StreamWriter
Handler = Callable[[Request, Writer], Awaitable[None]]


def parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    """Method, target and headers (names lowercased) of a request head ending in CRLFCRLF."""
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return method, path, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    """The request body the head announces: Content-Length or chunked, else none."""
    if "content-length" in headers:
        return await reader.readexactly(int(headers["content-length"]))
    if headers.get("transfer-encoding", "").lower() != "chunked":
        return b""
    body = b""
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return body
        body += chunk[:-2]


@dataclass
class ScriptedUpstream:
    """HTTP/1.1 upstream whose behaviour per path is a coroutine given the raw writer."""

    handlers: dict[str, Handler]
    port: int = 0
    seen: list[Request] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    closed_connections: int = 0
    open_connections: int = 0
    peak_connections: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _read_request(self, reader: asyncio.StreamReader) -> Request | None:
        method, path, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        body = await read_body(reader, headers)
        return Request(method, path, headers, body, reader)

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        self.open_connections += 1
        self.peak_connections = max(self.peak_connections, self.open_connections)
        sequence = 0
        try:
            while True:
                try:
                    request = await self._read_request(reader)
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                if request is None:
                    return
                request.sequence, sequence = sequence, sequence + 1
                self.seen.append(request)
                self.arrived.set()
                handler = self.handlers.get(request.path.split("?")[0], not_found)
                await handler(request, writer)
                if writer.is_closing():
                    return
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self.closed_connections += 1
            writer.close()

    @asynccontextmanager
    async def running(self) -> AsyncIterator[ScriptedUpstream]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


def respond(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Handler:
    async def handler(request: Request, writer: Writer) -> None:
        head = f"HTTP/1.1 {status} X\r\ncontent-length: {len(body)}\r\n"
        for name, value in (headers or {}).items():
            head += f"{name}: {value}\r\n"
        payload = b"" if request.method == "HEAD" else body
        writer.write(head.encode() + b"\r\n" + payload)
        await writer.drain()

    return handler


not_found = respond(404, b"not found")


async def echo(request: Request, writer: Writer) -> None:
    await respond(200, request.body)(request, writer)


def delayed(seconds: float, then: Handler) -> Handler:
    async def handler(request: Request, writer: Writer) -> None:
        await asyncio.sleep(seconds)
        await then(request, writer)

    return handler


async def hang(request: Request, writer: Writer) -> None:
    """Never answer; return when the proxy closes the connection (or after 30 s)."""
    assert request.reader is not None
    with suppress(TimeoutError, ConnectionError):
        await asyncio.wait_for(request.reader.read(), 30)
    writer.close()


def stale_after_first(*, reset: bool = False) -> Handler:
    """Answer the first request on a connection; when the next one arrives on it, close the
    connection without answering (with a FIN, or with a RST when ``reset``)."""

    async def handler(request: Request, writer: Writer) -> None:
        if request.sequence >= 1:
            if reset:
                abort_with_reset(writer)
            else:
                writer.close()
            return
        await respond(200, b"ok")(request, writer)

    return handler


def abort_with_reset(writer: Writer) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        # SO_LINGER 0: close() sends RST instead of FIN.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


def send_raw(data: bytes, *, close: bool = True) -> Handler:
    """Answer with exactly these bytes (a response that may be malformed on purpose)."""

    async def handler(request: Request, writer: Writer) -> None:
        writer.write(data)
        await writer.drain()
        if close:
            writer.close()

    return handler


async def endless_stream(request: Request, writer: Writer) -> None:
    """Chunked body, a chunk every 20 ms, for up to 30 s (until the peer goes away)."""
    writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
    for _ in range(1500):
        writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
        await writer.drain()
        await asyncio.sleep(0.02)
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def reset_mid_body(request: Request, writer: Writer) -> None:
    """Promise 100000 bytes, send 10, then reset the connection."""
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100000\r\n\r\n" + b"y" * 10)
    await writer.drain()
    await asyncio.sleep(0.05)
    abort_with_reset(writer)


async def raw_request(
    url: str, path: str, *, read_bytes: int = 0, hang_up_when: Callable[[], bool] | None = None
) -> None:
    """Send a GET over a raw socket, read ``read_bytes`` of the response (or wait until
    ``hang_up_when()``), then hang up."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"GET {path} HTTP/1.1\r\nhost: test\r\n\r\n".encode())
    await writer.drain()
    if read_bytes:
        await reader.readexactly(read_bytes)
    if hang_up_when is not None:
        await eventually(hang_up_when)
    writer.transport.abort()


async def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


def one_upstream(url: str, transport: str = "aiohttp", **upstream: Any) -> dict[str, Any]:
    """A config with one upstream named ``up`` behind the route ``/``."""
    return {
        "upstreams": {"up": {"url": url, "transport": transport, **upstream}},
        "routes": [{"prefix": "/", "upstream": "up"}],
    }


def pool_settled(relay: RunningRelay, name: str = "up") -> bool:
    """Nothing holds or waits for a connection to this upstream."""
    snapshot = relay.relay.upstreams()[name].snapshot()
    return snapshot.in_use == 0 and snapshot.waiting == 0


async def metric(relay: RunningRelay, name: str, **labels: str) -> float:
    """The sum of the scraped samples of ``name`` whose labels include ``labels``."""
    from prometheus_client.parser import text_string_to_metric_families

    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{relay.admin_url}/metrics")).text
    wanted = set(labels.items())
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and wanted <= set(sample.labels.items())
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RelayProcess:
    process: subprocess.Popen[bytes]
    url: str
    admin_url: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self) -> list[dict[str, Any]]:
        """The JSON log lines written so far (batched: at most 100 ms behind)."""
        return [json.loads(line) for line in self.log().splitlines() if line.startswith("{")]

    def messages(self, prefix: str) -> list[str]:
        return [line["message"] for line in self.lines() if line["message"].startswith(prefix)]


def wait_http(url: str, within: float = 20.0, status: int = 200) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"{url} did not answer {status} within {within}s")


@contextmanager
def spawn_relay(
    config: dict[str, Any],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    *,
    new_session: bool = False,
) -> Iterator[RelayProcess]:
    """``python -m service --config FILE`` as a real process on free loopback ports.

    ``new_session``: in a process group of its own, as a shell starts a command, so that
    ``os.killpg`` delivers a signal the way a terminal's Ctrl-C does."""
    port, admin_port = free_port(), free_port()
    server = {
        "host": "127.0.0.1",
        "admin_host": "127.0.0.1",
        "port": port,
        "admin_port": admin_port,
        # Teardown signals twice to skip the drain; two quick signals may arrive as one.
        "drain_delay_seconds": 0,
        **config.get("server", {}),
    }
    config_path = tmp_path / "relay.yaml"
    config_path.write_text(yaml.safe_dump({**config, "server": server}))
    log_path = tmp_path / "relay.log"
    full_env = {**os.environ, **(env or {})}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            start_new_session=new_session,
        )
    running = RelayProcess(
        process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path
    )
    try:
        try:
            wait_http(f"{running.admin_url}/readyz")
        except AssertionError:
            raise AssertionError(f"relay did not start:\n{running.log()}") from None
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                if new_session:
                    os.killpg(process.pid, signal.SIGKILL)
                process.kill()
                process.wait()


async def raw_exchange(url: str, request: bytes, within: float = 10.0) -> bytes:
    """Send raw request bytes on a fresh connection and read until the server closes."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), within)
    finally:
        writer.close()
