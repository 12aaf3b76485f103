"""The proxy under test: in the test process on ephemeral ports (``run_relay``), or as its
own process, ``python -m service`` (``spawn_relay``), and the configs the tests start it with.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import yaml

from service.app import Relay
from service.config import Settings
from service.server.listeners import Listeners
from service.server.serve import Service
from service.telemetry.tracing import Tracing
from tests.support.net import bind_local, free_port, port_of, wait_http
from tests.support.tiers import require_live


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


def one_upstream(url: str, transport: str = "aiohttp", **upstream: Any) -> dict[str, Any]:
    """A config with one upstream named ``up`` behind the route ``/``."""
    return {
        "upstreams": {"up": {"url": url, "transport": transport, **upstream}},
        "routes": [{"prefix": "/", "upstream": "up"}],
    }


def demo_config(**server: Any) -> dict[str, Any]:
    """The demo upstream served by the relay process itself, on free ports."""
    demo_port = free_port()
    return {
        "server": {"drain_delay_seconds": 0, "grace_period_seconds": 2, **server},
        "log": {"access_log": False},
        "demo": {"enabled": True, "host": "127.0.0.1", "port": demo_port},
        "upstreams": {"demo": {"url": f"http://127.0.0.1:{demo_port}"}},
        "routes": [{"prefix": "/", "upstream": "demo"}],
    }


def pool_settled(relay: RunningRelay, name: str = "up") -> bool:
    """Nothing holds or waits for a connection to this upstream, nor to any endpoint of it."""
    upstream = relay.relay.upstreams()[name]
    snapshot = upstream.snapshot()
    endpoints = upstream.balancer.endpoints if upstream.balancer is not None else ()
    return (
        snapshot.in_use == 0
        and snapshot.waiting == 0
        and all(endpoint.in_flight == 0 for endpoint in endpoints)
    )


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


@contextmanager
def spawn_relay(
    config: dict[str, Any],
    tmp_path: Path,
    env: dict[str, str] | None = None,
    *,
    new_session: bool = False,
    ready_within: float = 20.0,
    preexec_fn: Callable[[], None] | None = None,
) -> Iterator[RelayProcess]:
    """``python -m service --config FILE`` as a real process on free loopback ports, ready
    (``/readyz``) within ``ready_within`` seconds.

    ``new_session``: in a process group of its own, as a shell starts a command, so that
    ``os.killpg`` delivers a signal the way a terminal's Ctrl-C does. ``preexec_fn``: run in
    the child before it starts (say, to set its resource limits)."""
    require_live("a relay process")
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
            preexec_fn=preexec_fn,
        )
    running = RelayProcess(
        process, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}", log_path
    )
    try:
        try:
            wait_http(f"{running.admin_url}/readyz", within=ready_within)
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


def worker_processes(supervisor: psutil.Process) -> list[psutil.Process]:
    """The worker processes of a relay started with ``server.workers`` above 1."""
    # multiprocessing's spawn also starts a resource tracker; workers run spawn_main.
    return [p for p in supervisor.children() if "resource_tracker" not in " ".join(p.cmdline())]
