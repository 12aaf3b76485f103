"""The real process: built-in default config, and the SIGTERM drain."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.net import free_port, kill, wait_http, wait_until
from tests.support.relays import demo_config, spawn_relay
from tests.support.wire import refused

pytestmark = pytest.mark.live

# Long enough that a loaded machine serves the checks made during the drain delay within it.
DRAIN = 4
# A demo stream sends a line every 50 ms: this one outlasts the drain delay by 6 s.
STREAM_LINES = 200


def test_builtin_default_serves_the_demo_upstream(tmp_path: Path) -> None:
    """The README's first command, no config file: a real proxied response. Only the ports
    are moved, through ``RELAY_*`` overrides of the built-in default."""
    port, admin_port, demo_port = free_port(), free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OTEL_"))}
    env |= {
        "RELAY_SERVER__HOST": "127.0.0.1",
        "RELAY_SERVER__PORT": str(port),
        "RELAY_SERVER__ADMIN_HOST": "127.0.0.1",
        "RELAY_SERVER__ADMIN_PORT": str(admin_port),
        "RELAY_SERVER__DRAIN_DELAY_SECONDS": "0.2",
        "RELAY_DEMO__PORT": str(demo_port),
        "RELAY_UPSTREAMS__DEMO__URL": f"http://127.0.0.1:{demo_port}",
    }
    proxy, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    with open(tmp_path / "relay.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], stdout=log, stderr=log, env=env
        )
    try:
        wait_http(f"{admin}/readyz")
        assert httpx.get(f"{admin}/healthz").text == "ok\n"
        response = httpx.get(f"{proxy}/")
        assert response.status_code == 200
        assert response.json()["message"].startswith("hello from the demo upstream")
        assert response.headers["via"] == "1.1 relay"
        headers = httpx.get(f"{proxy}/headers").json()["headers"]
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert headers["host"] == f"127.0.0.1:{demo_port}"
        assert "relay_requests_total" in httpx.get(f"{admin}/metrics").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        kill(process)
    assert "Traceback" not in (tmp_path / "relay.log").read_text()


def stream_lines(url: str, started: threading.Event, result: dict[str, object]) -> None:
    try:
        with httpx.stream("GET", url, timeout=30) as response:
            lines = []
            for line in response.iter_lines():
                lines.append(line)
                started.set()
            result["lines"] = lines
    except httpx.HTTPError as exc:
        result["error"] = exc
    finally:
        started.set()


def test_sigterm_drains_without_losing_in_flight_streams(tmp_path: Path) -> None:
    config = demo_config(drain_delay_seconds=DRAIN, grace_period_seconds=15)
    with spawn_relay(config, tmp_path) as relay:
        started, result = threading.Event(), {}
        streamer = threading.Thread(
            target=stream_lines, args=(f"{relay.url}/stream/{STREAM_LINES}", started, result)
        )
        streamer.start()
        assert started.wait(10)
        signalled = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)

        wait_http(f"{relay.admin_url}/readyz", within=DRAIN / 2, status=503)
        # Still accepting new connections during the drain delay, so load balancers that
        # have not yet seen the readiness change lose nothing.
        for _ in range(3):
            assert httpx.get(f"{relay.url}/").status_code == 200
        assert time.monotonic() - signalled < DRAIN - 0.1
        wait_until(lambda: refused(f"{relay.url}/"), 10, "listener never closed")
        assert time.monotonic() - signalled >= DRAIN - 0.1
        # Listener closed, but the process waits for the in-flight stream.
        assert streamer.is_alive()
        assert relay.process.poll() is None

        streamer.join(timeout=20)
        assert "error" not in result, result
        assert result["lines"] == [f"line {i}" for i in range(STREAM_LINES)]
        assert relay.process.wait(timeout=20) == 0
        assert "Traceback" not in relay.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_streams_longer_than_the_grace_period_are_cut(tmp_path: Path, workers: int) -> None:
    config = demo_config(drain_delay_seconds=0.2, grace_period_seconds=1, workers=workers)
    # The supervisor empties its metrics directory at start: one per test, so that runs in
    # parallel on one machine never clear each other's.
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")} if workers > 1 else None
    with spawn_relay(config, tmp_path, env) as relay:
        started, result = threading.Event(), {}
        streamer = threading.Thread(
            target=stream_lines, args=(f"{relay.url}/stream/1000", started, result)
        )
        streamer.start()
        assert started.wait(10)
        signalled = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        assert relay.process.wait(timeout=20) == 0
        # Cut once the drain delay and the grace period are over, not sooner, not much later.
        assert 1.1 <= time.monotonic() - signalled < 8
        streamer.join(timeout=10)
        assert not streamer.is_alive()
        assert "error" in result, result  # cut, never presented as complete
