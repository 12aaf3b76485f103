"""Shared pieces of the benchmarks: processes on loopback, nginx, wrk, and the table."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(f"{binary} not found: apt-get install -y wrk nginx")
    return path


def wait_ready(url: str, within: float = 20.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


@contextmanager
def process(
    args: Sequence[str], env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        list(args),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


NGINX_UPSTREAM = """
worker_processes 1; daemon off; pid {tmp}/up.pid; error_log {tmp}/up-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{ listen 127.0.0.1:{port}; location / {{ root {tmp}/www; }} }}
}}
"""

NGINX_PROXY = """
worker_processes 1; daemon off; pid {tmp}/proxy.pid; error_log {tmp}/proxy-error.log;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{upstream}; keepalive 100; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}
}}
"""


@contextmanager
def nginx(template: str, **values: Any) -> Iterator[int]:
    binary = need("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        # nginx workers drop root privileges: they must be able to read the docroot.
        os.chmod(tmp, 0o755)
        www = Path(tmp, "www")
        www.mkdir()
        (www / "1k").write_bytes(b"x" * 1024)
        conf = Path(tmp, "nginx.conf")
        conf.write_text(template.format(tmp=tmp, port=port, **values))
        with process([binary, "-p", tmp, "-c", str(conf)]):
            wait_ready(f"http://127.0.0.1:{port}/1k")
            yield port


@contextmanager
def relay(
    upstream_port: int, transport: str, *, launcher: Sequence[str] = (), workers: int = 1
) -> Iterator[int]:
    """Relay as its own process, access log off."""
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory() as tmp:
        config = {
            "server": {
                "host": "127.0.0.1",
                "port": port,
                "admin_host": "127.0.0.1",
                "admin_port": admin,
                "drain_delay_seconds": 0,
                "grace_period_seconds": 1,
            },
            "log": {"access_log": False, "level": "WARNING"},
            "upstreams": {
                "up": {
                    "url": f"http://127.0.0.1:{upstream_port}",
                    "transport": transport,
                    "pool": {"max_connections": 100},
                }
            },
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        path = Path(tmp, "relay.yaml")
        path.write_text(yaml.safe_dump(config))
        args = list(launcher) or [sys.executable, "-m", "service"]
        env = {"PYTHONPATH": str(ROOT)}
        if workers > 1:
            env["PROMETHEUS_MULTIPROC_DIR"] = str(Path(tmp, "prom"))
        with process([*args, "--config", str(path)], env=env):
            wait_ready(f"http://127.0.0.1:{admin}/readyz")
            yield port


@dataclass
class WrkResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def wrk(name: str, url: str, duration: int, connections: int = 64) -> WrkResult:
    binary = need("wrk")
    out = subprocess.run(
        [binary, "-t2", f"-c{connections}", f"-d{duration}s", "--latency", url],
        capture_output=True,
        text=True,
        timeout=duration + 30,
        check=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1))  # type: ignore[union-attr]
    errors = 0
    if match := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(match.group(1))
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        errors += sum(int(g) for g in match.groups())
    return WrkResult(name, rps, p50, p99, errors)


def table(results: list[WrkResult], direct: WrkResult, nginx_proxy: WrkResult) -> str:
    rows = [
        "| system | req/s | p50 ms | p99 ms | errors | vs direct | vs nginx proxy |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        rows.append(
            f"| {r.name} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} | "
            f"{r.rps / direct.rps:.3f} | {r.rps / nginx_proxy.rps:.3f} |"
        )
    return "\n".join(rows)
