"""The systems the comparison measures (rows a..h), each started against a given upstream.

Every system is a context manager that yields what to send requests to (a ``Served``: its
port and the pid whose process group is the system, for CPU and memory figures) and stops
it on exit. The upstream is started by the caller; row (a) is the upstream itself.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path

from common import (
    BENCH,
    LOOPBACK,
    NGINX_HTTP,
    ROOT,
    Served,
    free_port,
    nginx,
    process,
    relay,
    wait_ready,
)

# nginx as a streaming reverse proxy: request and response bodies pass through (no temp
# files, no size limit), upstream connections kept alive and reused.
NGINX_STREAMING_PROXY = (
    NGINX_HTTP
    + """  upstream up {{ server 127.0.0.1:{upstream}; keepalive {keepalive}; }}
  server {{
    listen 127.0.0.1:{port};
    client_max_body_size 0;
    location / {{
      proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_request_buffering off; proxy_max_temp_file_size 0;
    }}
  }}
}}
"""
)


@dataclass(frozen=True)
class Context:
    """What every system is started with for one load."""

    upstream: Served
    pool: int  # upstream connections the proxy may open (and keep alive)
    otlp_endpoint: str  # the OTLP sink, for the telemetry-on rows


Starter = Callable[[Context], AbstractContextManager[Served]]


@dataclass(frozen=True)
class System:
    key: str
    id: str
    label: str
    start: Starter

    @property
    def is_proxy(self) -> bool:
        return self.key != "a"


@contextmanager
def direct(ctx: Context) -> Iterator[Served]:
    yield ctx.upstream


@contextmanager
def nginx_proxy(ctx: Context) -> Iterator[Served]:
    with nginx(NGINX_STREAMING_PROXY, upstream=ctx.upstream.port, keepalive=ctx.pool) as served:
        yield served


@contextmanager
def python_proxy(script: str, ctx: Context, *extra: str) -> Iterator[Served]:
    port = free_port()
    args = [
        sys.executable,
        str(BENCH / script),
        "--port",
        str(port),
        "--upstream",
        ctx.upstream.url(""),
        "--max-connections",
        str(ctx.pool),
        *extra,
    ]
    with process(args) as proc:
        wait_ready(f"http://{LOOPBACK}:{port}/", proc)
        yield Served(port, proc.pid)


def naive(transport: str, *extra: str) -> Starter:
    return lambda ctx: python_proxy("naive.py", ctx, "--transport", transport, *extra)


def raw_aiohttp(ctx: Context) -> AbstractContextManager[Served]:
    return python_proxy("raw_aiohttp.py", ctx)


def relay_row(
    *,
    workers: int = 1,
    sampled: str | None = None,
    source: Callable[[], Path] | None = None,
    instrumentation: str | None = None,
) -> Starter:
    """Relay; with ``sampled`` (a trace id ratio), the access log and tracing are on too.
    ``source``: where the ``service`` package to run is (default: this checkout);
    ``instrumentation``: ``tracing.instrumentation`` (default: the config's default)."""

    @contextmanager
    def start(ctx: Context) -> Iterator[Served]:
        env: dict[str, str | None] = {}
        if sampled is not None:
            env = {
                "OTEL_SDK_DISABLED": None,
                "OTEL_EXPORTER_OTLP_ENDPOINT": ctx.otlp_endpoint,
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": sampled,
                "OTEL_SERVICE_NAME": "relay-bench",
            }
        with relay(
            ctx.upstream.url(""),
            "aiohttp",
            max_connections=ctx.pool,
            workers=workers,
            access_log=sampled is not None,
            env=env,
            source=source() if source is not None else ROOT,
            instrumentation=instrumentation,
        ) as proc:
            yield proc

    return start


SYSTEMS = [
    System("a", "direct", "straight to the upstream (ceiling)", direct),
    System("b", "nginx", "nginx reverse proxy, 1 worker", nginx_proxy),
    System(
        "c", "naive", "naive FastAPI + httpx, client defaults (as documented)", naive("defaults")
    ),
    System("d", "naive-aiohttp", "naive FastAPI + httpx-aiohttp transport", naive("aiohttp")),
    System("e", "raw-aiohttp", "raw aiohttp reverse proxy", raw_aiohttp),
    System("f", "relay", "Relay, telemetry off", relay_row()),
    System(
        "g",
        "relay-telemetry",
        "Relay, telemetry on (access log, 10% of requests traced)",
        relay_row(sampled="0.1"),
    ),
    System("h", "relay-2w", "Relay, telemetry off, 2 workers", relay_row(workers=2)),
    System("i", "naive-pooled", "naive FastAPI + httpx, pool sized like Relay's", naive("httpx")),
    System(
        "j",
        "relay-traced",
        "Relay, access log and every request traced",
        relay_row(sampled="1"),
    ),
    System(
        "n",
        "relay-native",
        "Relay, telemetry on, tracing.instrumentation: native (10% traced)",
        relay_row(sampled="0.1", instrumentation="native"),
    ),
    System(
        "o",
        "relay-native-traced",
        "Relay, access log and every request traced, native",
        relay_row(sampled="1", instrumentation="native"),
    ),
]


def baseline_systems(revision: str, source: Callable[[], Path]) -> list[System]:
    """Rows (k), (l), (m): rows (f), (g), (j) run from an earlier revision's code."""
    return [
        System("k", "baseline", f"Relay at {revision}, telemetry off", relay_row(source=source)),
        System(
            "l",
            "baseline-telemetry",
            f"Relay at {revision}, telemetry on (access log, 10% traced)",
            relay_row(sampled="0.1", source=source),
        ),
        System(
            "m",
            "baseline-traced",
            f"Relay at {revision}, access log and every request traced",
            relay_row(sampled="1", source=source),
        ),
    ]


def select(only: str | None, systems: list[System] | None = None) -> list[System]:
    """Systems named in ``only`` (letters or ids, comma-separated), in table order."""
    systems = list(SYSTEMS) if systems is None else systems
    if not only:
        return systems
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    known = {s.key for s in systems} | {s.id for s in systems}
    if unknown := wanted - known:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {sorted(known)}")
    return [s for s in systems if s.key in wanted or s.id in wanted]
