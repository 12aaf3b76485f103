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

from tests.harness import spawn_relay, wait_http
from tests.test_metrics_live import demo_config


def test_builtin_default_serves_the_demo_upstream(tmp_path: Path) -> None:
    """The README's first command: no config, a real proxied response."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OTEL_"))}
    env["RELAY_SERVER__DRAIN_DELAY_SECONDS"] = "0.2"
    log = open(tmp_path / "relay.log", "wb")  # noqa: SIM115
    process = subprocess.Popen([sys.executable, "-m", "service"], stdout=log, stderr=log, env=env)
    try:
        wait_http("http://127.0.0.1:9090/readyz")
        response = httpx.get("http://127.0.0.1:8080/")
        assert response.status_code == 200
        assert response.json()["message"].startswith("hello from the demo upstream")
        assert response.headers["via"] == "1.1 relay"
        headers = httpx.get("http://127.0.0.1:8080/headers").json()["headers"]
        assert headers["x-forwarded-for"] == "127.0.0.1"
        assert "relay_requests_total" in httpx.get("http://127.0.0.1:9090/metrics").text
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


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


def refused(url: str) -> bool:
    try:
        httpx.get(url, timeout=1)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


def test_sigterm_drains_without_losing_in_flight_streams(tmp_path: Path) -> None:
    config = demo_config(drain_delay_seconds=1.5, grace_period_seconds=15)
    with spawn_relay(config, tmp_path) as relay:
        started, result = threading.Event(), {}
        streamer = threading.Thread(
            target=stream_lines, args=(f"{relay.url}/stream/60", started, result)
        )
        streamer.start()
        assert started.wait(10)
        signalled = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)

        wait_http(f"{relay.admin_url}/readyz", within=1, status=503)
        # Still accepting during the drain delay, so in-flight load balancing settles.
        assert httpx.get(f"{relay.url}/").status_code == 200
        deadline = time.monotonic() + 10
        while not refused(f"{relay.url}/"):
            assert time.monotonic() < deadline, "listener never closed"
            time.sleep(0.05)
        assert time.monotonic() - signalled >= 1.4

        streamer.join(timeout=20)
        assert "error" not in result, result
        assert result["lines"] == [f"line {i}" for i in range(60)]
        assert relay.process.wait(timeout=20) == 0
        assert "Traceback" not in relay.log()


@pytest.mark.parametrize("workers", [1, 2])
def test_streams_longer_than_the_grace_period_are_cut(tmp_path: Path, workers: int) -> None:
    config = demo_config(drain_delay_seconds=0.2, grace_period_seconds=1, workers=workers)
    with spawn_relay(config, tmp_path) as relay:
        started, result = threading.Event(), {}
        streamer = threading.Thread(
            target=stream_lines, args=(f"{relay.url}/stream/1000", started, result)
        )
        streamer.start()
        assert started.wait(10)
        signalled = time.monotonic()
        relay.process.send_signal(signal.SIGTERM)
        assert relay.process.wait(timeout=20) == 0
        assert time.monotonic() - signalled < 8
        streamer.join(timeout=10)
        assert "error" in result  # cut, never presented as complete
