"""Start-up says what it is doing and fails clearly: the real ``python -m service``.

A clean run names the config and each listener once, and nothing in it reads as an error;
a port that is taken stops the process with one line and exit code 3, with one worker or
several; the text format carries what the JSON one does.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.server.listeners import EXIT_CANNOT_START
from tests.support.net import free_port, kill, wait_http, wait_until
from tests.support.recording import recording_upstream_thread
from tests.support.relays import spawn_relay

pytestmark = pytest.mark.live

ROOT = Path(__file__).resolve().parent.parent
RFC3339_MS_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OTEL_"))}
    return {**env, **extra}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_clean_run_says_what_runs_where(tmp_path: Path, workers: int) -> None:
    """The built-in default (no config file), ports moved by ``RELAY_*`` variables."""
    port, admin_port, demo_port = free_port(), free_port(), free_port()
    overrides = {
        "RELAY_SERVER__HOST": "127.0.0.1",
        "RELAY_SERVER__PORT": str(port),
        "RELAY_SERVER__ADMIN_HOST": "127.0.0.1",
        "RELAY_SERVER__ADMIN_PORT": str(admin_port),
        "RELAY_SERVER__WORKERS": str(workers),
        "RELAY_DEMO__PORT": str(demo_port),
        "RELAY_UPSTREAMS__DEMO__URL": f"http://127.0.0.1:{demo_port}",
    }
    env = clean_env(**overrides, PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom"))
    log_path = tmp_path / "relay.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service"], stdout=log, stderr=subprocess.STDOUT, env=env
        )
    try:
        wait_http(f"http://127.0.0.1:{admin_port}/readyz")
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0
    finally:
        kill(process)
    text = log_path.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    messages = [line["message"] for line in lines]
    assert all(RFC3339_MS_UTC.match(line["time"]) for line in lines)
    # Every listener bound before anything is said; the config first, in one line.
    variables = ", ".join(sorted(overrides))
    assert messages[:4] == [
        f"config: built-in demo config (no --config or RELAY_CONFIG), overridden by "
        f"{variables}; routes: / -> demo; upstreams: demo http://127.0.0.1:{demo_port}/",
        f"proxy listener on http://127.0.0.1:{port}",
        f"admin listener on http://127.0.0.1:{admin_port} (/healthz, /readyz, /metrics)",
        f"demo listener on http://127.0.0.1:{demo_port} (the built-in demo upstream)",
    ]
    assert sum(m.startswith("ready: relay ") for m in messages) == workers
    assert sum(m.startswith("stopped") for m in messages) == workers + (workers > 1)
    # uvicorn's per-listener lines are gone, and nothing in a clean run reads as an error.
    assert not [m for m in messages if "server process" in m or "Uvicorn running" in m]
    assert "error" not in text.lower()
    assert {line["level"] for line in lines} == {"INFO"}
    # The built-in default has no drain delay: Ctrl-C or SIGTERM closes the listener at once.
    draining = [m for m in messages if "draining" in m]
    assert draining and all("closes in 0s" in m for m in draining)


def test_the_config_file_is_named(tmp_path: Path) -> None:
    upstream_port = free_port()
    config = {
        "upstreams": {"api": {"url": f"http://127.0.0.1:{upstream_port}/base"}},
        "routes": [
            {"prefix": "/api", "host": "api.example.com", "upstream": "api"},
            {"prefix": "/", "upstream": "api"},
        ],
    }
    with spawn_relay(config, tmp_path, clean_env()) as relay:
        pass
    first = relay.lines()[0]["message"]
    assert first == (
        f"config: {tmp_path / 'relay.yaml'}; routes: api.example.com/api -> api, / -> api; "
        f"upstreams: api http://127.0.0.1:{upstream_port}/base"
    )


@contextmanager
def port_taken() -> Iterator[int]:
    """A port held by another socket, listening, as another program would hold it."""
    holder = socket.socket()
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    try:
        yield int(holder.getsockname()[1])
    finally:
        holder.close()


FIELDS = {
    "proxy": "server.host, server.port",
    "admin": "server.admin_host, server.admin_port",
    "demo": "demo.host, demo.port",
}


def ports_config(taken: str, port: int, workers: int) -> dict[str, Any]:
    ports = {name: free_port() for name in FIELDS}
    ports[taken] = port
    return {
        "server": {
            "host": "127.0.0.1",
            "port": ports["proxy"],
            "admin_host": "127.0.0.1",
            "admin_port": ports["admin"],
            "workers": workers,
        },
        "demo": {"enabled": True, "host": "127.0.0.1", "port": ports["demo"]},
        "upstreams": {"demo": {"url": f"http://127.0.0.1:{ports['demo']}"}},
        "routes": [{"prefix": "/", "upstream": "demo"}],
    }


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("taken", ["proxy", "admin", "demo"])
def test_a_port_in_use_is_one_line_and_exit_code_3(
    tmp_path: Path, taken: str, workers: int
) -> None:
    config_path = tmp_path / "relay.yaml"
    with port_taken() as port:
        config_path.write_text(yaml.safe_dump(ports_config(taken, port, workers)))
        result = subprocess.run(
            [sys.executable, "-m", "service", "--config", str(config_path)],
            capture_output=True,
            text=True,
            timeout=60,
            env=clean_env(PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom")),
        )
    assert result.returncode == EXIT_CANNOT_START == 3
    output = (result.stdout + result.stderr).splitlines()
    assert len(output) == 1, output
    line = json.loads(output[0])
    assert (line["level"], line["logger"]) == ("ERROR", "relay.server")
    assert line["message"] == (
        f"{taken} listener: cannot listen on 127.0.0.1:{port} ({FIELDS[taken]}): "
        "Address already in use"
    )


def test_text_format_over_a_real_process(tmp_path: Path) -> None:
    demo_port = free_port()
    config = {
        "log": {"format": "text"},
        "demo": {"enabled": True, "host": "127.0.0.1", "port": demo_port},
        "upstreams": {"demo": {"url": f"http://127.0.0.1:{demo_port}"}},
        "routes": [{"prefix": "/", "upstream": "demo"}],
    }
    with spawn_relay(config, tmp_path, clean_env()) as relay:
        assert httpx.get(f"{relay.url}/bytes/300").status_code == 200
        relay.process.send_signal(signal.SIGTERM)
        assert relay.process.wait(timeout=30) == 0
    lines = relay.log().splitlines()
    access = [line for line in lines if " relay.access " in line]
    assert len(access) == 1
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO relay\.access GET /bytes/300 200 "
        r"\d+\.\dms route=demo upstream=demo outcome=ok headers_ms=\d+\.\d "
        r"request_bytes=0 response_bytes=300 upstream_addr=127\.0\.0\.1:\d+ "
        r"request_id=[0-9a-f]{32} client_addr=127\.0\.0\.1 "
        r"peer_addr=127\.0\.0\.1 http_version=1\.1 user_agent=python-httpx/\S+",
        access[0],
    ), access[0]
    assert any(line.endswith(f"INFO relay.server proxy listener on {relay.url}") for line in lines)
    assert not any(line.lstrip().startswith("{") for line in lines)


def test_each_serving_process_tunes_its_garbage_collector_once(tmp_path: Path) -> None:
    """At the entry point of every process that serves (here two workers), after start-up:
    nothing else in those processes, and nothing in a process that embeds a relay, does."""
    upstream_port = free_port()
    config = {
        "server": {"workers": 2},
        "log": {"level": "DEBUG"},
        "upstreams": {"api": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [{"prefix": "/", "upstream": "api"}],
    }
    with spawn_relay(config, tmp_path, clean_env()) as relay:
        pass
    lines = relay.lines()
    tuned = [line for line in lines if line["message"].startswith("gc: ")]
    ready = [line for line in lines if line["message"].startswith("ready: relay ")]
    assert len(tuned) == len(ready) == 2, relay.log()[-3000:]
    assert all(m["message"].endswith("thresholds (20000, 20, 20)") for m in tuned)


def startup_probe_budget() -> float:
    """Seconds the base Deployment's startup probe gives a pod before restarting it."""
    documents = yaml.safe_load_all((ROOT / "k8s" / "base" / "deployment.yaml").read_text())
    deployment = next(d for d in documents if d and d.get("kind") == "Deployment")
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    probe = container["startupProbe"]
    return float(probe["periodSeconds"] * probe["failureThreshold"])


def test_a_thousand_upstreams_start_well_within_the_startup_probe(tmp_path: Path) -> None:
    """Platform size: 1,000 upstreams and routes cost what one does at start (no TLS
    context, DNS resolver or metric children per upstream), so a pod is ready long before
    its startup probe gives up; and the last route and its upstream work."""
    budget = startup_probe_budget()
    count = 1000
    with recording_upstream_thread() as upstream:
        config = {
            "log": {"access_log": False},
            "upstreams": {f"u{n}": {"url": upstream.url} for n in range(count)},
            "routes": [{"prefix": f"/svc{n}", "upstream": f"u{n}"} for n in range(count)],
        }
        started = time.monotonic()
        with spawn_relay(config, tmp_path, ready_within=budget) as relay:
            took = time.monotonic() - started
            # A quarter of the budget: today about 1 s on one core; the margin is for a
            # loaded CI machine, not for per-upstream cost creeping back.
            assert took < budget / 4, f"ready after {took:.1f}s (probe budget {budget:.0f}s)"
            last = count - 1
            answer = httpx.get(f"{relay.url}/svc{last}/x", timeout=10)
            assert answer.status_code == 200
            assert upstream.requests[-1].target == f"/svc{last}/x".encode()
            metrics = httpx.get(f"{relay.admin_url}/metrics", timeout=30).text
            stale = f'reason="stale_connection",upstream="u{last}"'
            assert f"relay_upstream_retries_total{{{stale}}} 0.0" in metrics


def test_the_open_files_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    """Every connection is a descriptor: a soft limit of 1,024 under a far higher hard one
    (what many runtimes give) would cap the proxy long before memory does."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard open-files limit ({hard}) leaves nothing to raise")
    expected = hard if hard != resource.RLIM_INFINITY else 1 << 20

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    config = {
        "upstreams": {"api": {"url": f"http://127.0.0.1:{free_port()}"}},
        "routes": [{"prefix": "/", "upstream": "api"}],
    }
    with spawn_relay(config, tmp_path, preexec_fn=low_soft_limit) as relay:
        metrics = httpx.get(f"{relay.admin_url}/metrics", timeout=10).text
        assert f"process_max_fds {float(expected)}" in metrics
        raised = f"open files: soft limit raised from 256 to {expected} (the hard limit)"
        wait_until(lambda: relay.messages(raised) == [raised], 10, "the line saying so")
