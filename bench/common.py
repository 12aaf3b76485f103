"""Shared pieces of the benchmarks: processes on loopback, nginx, Relay, wrk, tables.

Every process a benchmark starts runs in its own session and is stopped (SIGTERM, then
SIGKILL) when its ``with`` block ends, whatever ends it: normal exit, an exception, Ctrl-C,
or SIGTERM/SIGHUP to the benchmark (``handle_signals`` turns those into ``SystemExit``).
Everything binds 127.0.0.1 only.

Standalone on purpose: the Relay launcher and the metrics parser here repeat what
``tests/support/`` does, because a benchmark must not depend on the test helpers (it runs
with the bench extra only, and starts a baseline revision of Relay as a plain process).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

import httpx
import yaml

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
LOOPBACK = "127.0.0.1"

# Which process serves Relay for each transport row: the service itself, or the bench-only
# harness that swaps in httpx-aiohttp's stock transport (the YAML still says "aiohttp").
TRANSPORTS = ("aiohttp", "httpcore", "stock")
TRANSPORT_LABELS = {
    "aiohttp": "Relay, transport: aiohttp (service/upstreams/aiohttp_pool.py)",
    "httpcore": "Relay, transport: httpcore (httpx default pool)",
    "stock": "Relay, stock httpx_aiohttp.AiohttpTransport",
}


def handle_signals() -> None:
    """SIGTERM/SIGHUP end the benchmark like Ctrl-C does: by unwinding, so cleanup runs."""

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        sys.exit(f"{binary} not found: apt-get update && apt-get install -y wrk nginx")
    return path


def wait_ready(url: str, proc: subprocess.Popen[bytes] | None = None, within: float = 20) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1, trust_env=False).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up within {within}s")


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the benchmark dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextmanager
def process(
    args: Sequence[str],
    env: Mapping[str, str | None] | None = None,
    log: Path | None = None,
    cwd: Path | None = None,
) -> Iterator[subprocess.Popen[bytes]]:
    """A child in its own session (so its whole group can be stopped), stopped on exit.

    ``env`` is added to this process's environment; a value of None removes the variable.
    """
    child_env = {**os.environ, **(env or {})}
    out = log.open("wb") if log is not None else subprocess.DEVNULL
    # preexec_fn: single-threaded callers only (the benchmarks are).
    try:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT if log is not None else subprocess.DEVNULL,
            env={name: value for name, value in child_env.items() if value is not None},
            start_new_session=True,
            preexec_fn=_die_with_parent,
            cwd=cwd,
        )
    finally:
        if log is not None and not isinstance(out, int):
            out.close()
    try:
        yield proc
    finally:
        _stop(proc)


# -- nginx ---------------------------------------------------------------------------------

# What every nginx of the benchmarks shares: one worker in the foreground, no access log,
# its files in its own directory; the ``http`` block's upstreams and servers follow.
NGINX_HTTP = """
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body; proxy_temp_path {tmp}/proxy;
  fastcgi_temp_path {tmp}/fcgi; uwsgi_temp_path {tmp}/uwsgi; scgi_temp_path {tmp}/scgi;
"""

NGINX_UPSTREAM = (
    NGINX_HTTP
    + """  server {{ listen 127.0.0.1:{port}; location / {{ root {tmp}/www; }} }}
}}
"""
)

NGINX_PROXY = (
    NGINX_HTTP
    + """  upstream up {{ server 127.0.0.1:{upstream}; keepalive 100; }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
    }}
  }}
}}
"""
)


@dataclass(frozen=True)
class Served:
    port: int
    pid: int

    def url(self, path: str) -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"


@contextmanager
def nginx(template: str, files: dict[str, int] | None = None, **values: Any) -> Iterator[Served]:
    """nginx with its own config under a temp dir: daemon off, ``-p`` prefix, 1 worker.

    ``files`` maps docroot names to sizes; they are created sparse (no disk, no page
    cache pressure), so a 1 GiB file costs nothing.
    """
    binary = need("nginx")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-nginx-") as tmp:
        # Workers drop root privileges: they must be able to read the docroot.
        os.chmod(tmp, 0o755)
        www = Path(tmp, "www")
        www.mkdir()
        for name, size in (files or {"1k": 1024}).items():
            with Path(www, name).open("wb") as f:
                if size <= 1 << 20:
                    f.write(b"x" * size)
                else:
                    f.truncate(size)
        conf = Path(tmp, "nginx.conf")
        conf.write_text(template.format(tmp=tmp, port=port, **values))
        args = [binary, "-p", tmp, "-e", f"{tmp}/error.log", "-c", str(conf)]
        with process(args) as proc:
            wait_ready(f"http://{LOOPBACK}:{port}/", proc)
            yield Served(port, proc.pid)


# -- Relay ---------------------------------------------------------------------------------


def server_section(
    port: int, admin: int, workers: int = 1, drain: float = 0, grace: float = 1
) -> dict[str, Any]:
    """The ``server:`` section of a benchmark's Relay: loopback listeners, no drain delay."""
    return {
        "host": LOOPBACK,
        "port": port,
        "admin_host": LOOPBACK,
        "admin_port": admin,
        "workers": workers,
        "drain_delay_seconds": drain,
        "grace_period_seconds": grace,
    }


@contextmanager
def relay(
    upstream_url: str,
    transport: str,
    *,
    max_connections: int = 100,
    pool_timeout: float = 5.0,
    workers: int = 1,
    access_log: bool = False,
    env: Mapping[str, str | None] | None = None,
    source: Path = ROOT,
    instrumentation: str | None = None,
    upstream: Mapping[str, Any] | None = None,
) -> Iterator[ServedRelay]:
    """Relay as its own process: one upstream, one route; 1 worker, access log off.

    ``source`` is the directory holding the ``service`` package to run: this checkout, or
    an earlier revision's (``baseline_source``) measured side by side with it.

    ``env`` is added last, so it can turn tracing on (e.g. ``OTEL_SDK_DISABLED=""`` and an
    ``OTEL_EXPORTER_OTLP_ENDPOINT``). With ``access_log`` the log level is INFO (access lines
    are INFO records) and stdout, where they go, is the file ``ServedRelay.log``.
    ``upstream``: more fields of the upstream (endpoints, balance, ...).
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}")
    port, admin = free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="relay-bench-") as tmp:
        config = {
            "server": server_section(port, admin, workers),
            "log": {"access_log": access_log, "level": "INFO" if access_log else "WARNING"},
            "upstreams": {
                "up": {
                    "url": upstream_url,
                    "transport": "aiohttp" if transport == "stock" else transport,
                    "pool": {
                        "max_connections": max_connections,
                        "max_keepalive_connections": max_connections,
                    },
                    "timeouts": {"pool": pool_timeout},
                    **(upstream or {}),
                }
            },
            "routes": [{"prefix": "/", "upstream": "up"}],
        }
        if instrumentation is not None:
            config["tracing"] = {"instrumentation": instrumentation}
        path = Path(tmp, "relay.yaml")
        path.write_text(yaml.safe_dump(config))
        if transport == "stock" and workers != 1:
            raise ValueError("the stock-transport harness runs one worker only")
        if transport == "stock":
            args = [sys.executable, str(BENCH / "stock_httpx_aiohttp.py")]
        else:
            args = [sys.executable, "-m", "service"]
        # By default no tracing exporter and in-process metrics: the plain service.
        # Several workers need a multiprocess metrics directory: a private one, never the
        # shared default. One worker must not have the variable at all: prometheus-client
        # turns multiprocess mode on when it is merely set, even empty (files in the cwd).
        multiproc = str(Path(tmp, "prometheus")) if workers > 1 else None
        child_env: dict[str, str | None] = {
            "PYTHONPATH": str(source),
            "OTEL_SDK_DISABLED": "true",
            "PROMETHEUS_MULTIPROC_DIR": multiproc,
            **(env or {}),
        }
        log = Path(tmp, "relay.log")
        # ``python -m`` imports from the working directory before PYTHONPATH: run where
        # ``source`` is, or a baseline would silently measure this checkout.
        with process([*args, "--config", str(path)], env=child_env, log=log, cwd=source) as proc:
            try:
                wait_ready(f"http://{LOOPBACK}:{admin}/readyz", proc)
            except RuntimeError:
                sys.stderr.write(log.read_text(errors="replace")[-4000:])
                raise
            yield ServedRelay(port, proc.pid, admin, log)


@dataclass(frozen=True)
class ServedRelay(Served):
    admin_port: int
    log: Path

    def metrics(self) -> ScrapedSamples:
        text = httpx.get(
            f"http://{LOOPBACK}:{self.admin_port}/metrics", timeout=5, trust_env=False
        ).text
        return ScrapedSamples.parse(text)


@dataclass(frozen=True)
class ScrapedSamples:
    """Samples of the Prometheus text format: (name, sorted label pairs) -> value."""

    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]

    @classmethod
    def parse(cls, text: str) -> ScrapedSamples:
        samples = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            pairs = re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels)
            samples[(name, tuple(sorted(pairs)))] = float(value)
        return cls(samples)

    def sum(self, name: str, **labels: str) -> float:
        """The sum of every sample of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(
            value
            for (sample, pairs), value in self.samples.items()
            if sample == name and want <= set(pairs)
        )


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process: its peak resident set since it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmHWM for {pid}")


# -- wrk -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    name: str
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int
    # Of the socket errors: responses slower than wrk's timeout (left out of the latencies).
    timeouts: int = 0


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        raise ValueError(f"unexpected wrk latency {text!r}")
    value, unit = match.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def _find(pattern: str, text: str) -> str:
    match = re.search(pattern, text, re.M)
    if match is None:
        raise RuntimeError(f"wrk output without {pattern!r}:\n{text}")
    return match.group(1)


def wrk(
    name: str,
    url: str,
    duration: int,
    connections: int = 64,
    threads: int = 2,
    timeout: int | None = None,
) -> WrkResult:
    """One wrk run; ``timeout`` (s) replaces wrk's 2 s limit after which a request counts
    as a socket error instead of a latency sample."""
    binary = need("wrk")
    extra = [f"--timeout={timeout}s"] if timeout is not None else []
    done = subprocess.run(
        [binary, f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--latency", *extra, url],
        capture_output=True,
        text=True,
        timeout=duration + 30 + (timeout or 0),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    out = done.stdout
    socket_errors = timeouts = 0
    if match := re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    ):
        socket_errors = sum(int(g) for g in match.groups())
        timeouts = int(match.group(4))
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return WrkResult(
        name=name,
        rps=float(_find(r"Requests/sec:\s+([\d.]+)", out)),
        p50_ms=_ms(_find(r"^\s+50%\s+(\S+)", out)),
        p99_ms=_ms(_find(r"^\s+99%\s+(\S+)", out)),
        requests=int(_find(r"^\s+(\d+) requests in", out)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=socket_errors,
        timeouts=timeouts,
    )


@contextmanager
def baseline_source(revision: str) -> Iterator[Path]:
    """The ``service`` package as it was at ``revision`` (any git revision of this checkout),
    in a temporary directory, to run beside the working tree's in one comparison."""
    with tempfile.TemporaryDirectory(prefix="relay-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", revision, "service"],
            capture_output=True,
            check=False,
        )
        if archive.returncode != 0:
            raise SystemExit(f"--baseline {revision}: {archive.stderr.decode().strip()}")
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        yield Path(tmp)


# -- reporting -----------------------------------------------------------------------------


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; columns after the first are right-aligned."""
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _version(name: str) -> str:
    # httpx-aiohttp comes with the bench extra only; the short soak in the test suite runs
    # without it.
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> str:
    """One line naming what was measured: versions, cores, load."""
    names = ("httpx", "httpcore", "aiohttp", "httpx-aiohttp", "uvicorn", "uvloop", "fastapi")
    versions = ", ".join(f"{n} {_version(n)}" for n in names)
    nginx_binary = shutil.which("nginx")
    nginx_version = ""
    if nginx_binary:
        banner = subprocess.run([nginx_binary, "-v"], capture_output=True, text=True).stderr
        nginx_version = f", {banner.strip().removeprefix('nginx version: ')}"
    return (
        f"Python {platform.python_version()}, {versions}{nginx_version}; "
        f"{os.cpu_count()} CPUs, load average {load()}"
    )


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())
