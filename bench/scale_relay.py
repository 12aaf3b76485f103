"""Relay at platform size for ``bench/scale.py``: generated configs, a bounded start, scrapes.

Relay runs as a plain process (``python -m service --config FILE``) with a YAML config
written here, so the benchmark runs unchanged against any revision of ``service/``. A start
is bounded in time and in memory: a revision whose per-upstream cost is high is stopped
when it passes ``max_rss_mb`` or ``timeout`` instead of taking the shared machine down.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml
from common import LOOPBACK, ROOT, free_port, process, server_section
from loads import tree_rss

MB = 1_000_000
FORMATS = {
    "text": "text/plain",
    "OpenMetrics": "application/openmetrics-text; version=1.0.0; charset=utf-8",
}


class StartFailed(RuntimeError):
    """Relay did not answer /readyz 200 within the budget (time, memory or an exit)."""


@dataclass(frozen=True)
class Started:
    port: int
    admin_port: int
    pid: int
    ready_seconds: float  # from spawning the process to /readyz answering 200
    ready_rss_kib: int  # resident memory of the process tree at that moment

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    def admin(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.admin_port}{path}"


def rss_kib(pid: int) -> int:
    """Resident memory now (not the peak) of a process and its descendants (workers)."""
    return tree_rss(pid) // 1024


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def max_open_files(pid: int) -> str:
    """The soft limit on open files the process runs with (from /proc/PID/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return line.split()[3]
    return "?"


def upstreams_config(count: int, url: str | None = None, dead: int = 0) -> dict[str, Any]:
    """``count`` upstreams, each with one route of its own (``/u00042`` -> ``u00042``).

    Without ``url`` every upstream gets a port of its own on 127.0.0.1 (nothing is sent to
    them: a start-up measure); with it they all point there, except the last ``dead`` ones,
    which point to a port where nothing listens (502 connect errors).
    """
    closed = free_port() if dead else 0
    upstreams, routes = {}, []
    for i in range(count):
        name = f"u{i:05d}"
        if url is None:
            target = f"http://{LOOPBACK}:{20000 + i}"
        else:
            target = url if i < count - dead else f"http://{LOOPBACK}:{closed}"
        upstreams[name] = {"url": target}
        routes.append({"prefix": f"/{name}", "upstream": name, "strip_prefix": True})
    return {"upstreams": upstreams, "routes": routes}


def routes_config(count: int, url: str) -> dict[str, Any]:
    """``count`` prefix routes of equal length (``/svc00000`` ...) to one upstream.

    Equal lengths make every route tie on precedence, so they keep config order and the
    last one is the last a linear scan reaches: ``worst_path(count)``.
    """
    routes = [
        {"name": f"r{i:05d}", "prefix": f"/svc{i:05d}", "upstream": "up", "strip_prefix": True}
        for i in range(count)
    ]
    return {"upstreams": {"up": {"url": url}}, "routes": routes}


def worst_path(count: int, rest: str = "/1k") -> str:
    return f"/svc{count - 1:05d}{rest}"


def _wait_ready(
    proc: Any, url: str, started: float, timeout: float, max_rss_mb: int
) -> tuple[float, int]:
    """Seconds since ``started`` when ``url`` answered 200, and the RSS then (KiB)."""
    deadline = started + timeout
    with httpx.Client(timeout=1, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise StartFailed(f"exited with code {proc.returncode}")
            try:
                # A new connection each time: nothing kept open to a process not serving yet.
                answer = client.get(url, headers={"Connection": "close"})
                if answer.status_code == 200:
                    return time.monotonic() - started, rss_kib(proc.pid)
            except httpx.HTTPError:
                pass
            rss = rss_kib(proc.pid)
            if rss * 1024 > max_rss_mb * MB:
                elapsed = time.monotonic() - started
                raise StartFailed(
                    f"RSS {rss * 1024 / MB:,.0f} MB > {max_rss_mb:,} MB at {elapsed:.0f} s"
                )
            time.sleep(0.02)
    raise StartFailed(
        f"not ready within {timeout:.0f} s (RSS {rss_kib(proc.pid) * 1024 / MB:,.0f} MB)"
    )


@contextmanager
def scaled_relay(
    parts: dict[str, Any],
    *,
    workers: int = 1,
    timeout: float = 60,
    max_rss_mb: int = 3000,
) -> Iterator[Started]:
    """Relay with ``parts`` (upstreams, routes) in its config; one worker unless told,
    access log off. Stopped when the block ends."""
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-scale-") as tmp:
        config = {
            "server": server_section(port, admin, workers),
            "log": {"access_log": False, "level": "WARNING"},
            **parts,
        }
        path = Path(tmp, "relay.yaml")
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        # As in common.relay(): a private multiprocess directory for several workers, and
        # none at all for one (prometheus-client turns the mode on when it is merely set).
        env = {
            "PYTHONPATH": str(ROOT),
            "OTEL_SDK_DISABLED": "true",
            "PROMETHEUS_MULTIPROC_DIR": str(Path(tmp, "prometheus")) if workers > 1 else None,
        }
        log = Path(tmp, "relay.log")
        args = [sys.executable, "-m", "service", "--config", str(path)]
        started = time.monotonic()
        with process(args, env=env, log=log, cwd=ROOT) as proc:
            try:
                seconds, rss = _wait_ready(
                    proc, f"http://{LOOPBACK}:{admin}/readyz", started, timeout, max_rss_mb
                )
            except StartFailed:
                tail = log.read_text(errors="replace")[-2000:]
                if tail.strip():
                    sys.stderr.write(tail)
                raise
            yield Started(port, admin, proc.pid, seconds, rss)


# -- scrapes -------------------------------------------------------------------------------


def traffic(relay: Any, count: int) -> Counter[int]:
    """One request per route, each on a new connection so several workers share them."""
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(timeout=10, trust_env=False, limits=limits) as client:
        for i in range(count):
            statuses[client.get(relay.url(f"/u{i:05d}/1k")).status_code] += 1
        statuses[client.get(relay.url("/no-route")).status_code] += 1
    return statuses


def family(line: bytes) -> str:
    name = line.split(b"{", 1)[0].split(b" ", 1)[0].decode()
    for suffix in ("_bucket", "_count", "_sum", "_total", "_created"):
        name = name.removesuffix(suffix)
    return name


def measure_scrape(url: str, accept: str, count: int) -> dict[str, Any]:
    times = []
    with httpx.Client(timeout=30, trust_env=False) as client:
        client.get(url, headers={"Accept": accept})  # not counted: first-scrape work
        for _ in range(count):
            started = time.perf_counter()
            answer = client.get(url, headers={"Accept": accept})
            times.append((time.perf_counter() - started) * 1000)
            answer.raise_for_status()
    samples = [line for line in answer.content.splitlines() if line and not line.startswith(b"#")]
    return {
        "ms": statistics.median(times),
        "max_ms": max(times),
        "bytes": len(answer.content),
        "series": len(samples),
        "content_type": answer.headers.get("content-type", ""),
        "top_families": Counter(family(line) for line in samples).most_common(4),
    }
