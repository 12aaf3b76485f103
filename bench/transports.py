"""Throughput and latency of Relay's transports against nginx, in one run, on loopback.

1 KiB GET, ``wrk -t2 -c64 -d10s --latency``. Rows, all against the same nginx upstream
(1 worker, a 1 KiB file):

  (a) straight to the upstream;
  (b) nginx as a reverse proxy (1 worker, keep-alive pool of 100);
  (c) Relay, ``transport: aiohttp`` (service/upstreams/aiohttp_pool.py);
  (d) Relay, ``transport: httpcore`` (httpx's default pool);
  (e) Relay with httpx-aiohttp's stock ``AiohttpTransport`` (bench/stock_httpx_aiohttp.py).

Relay runs as its own process: 1 worker, access log off, pool max_connections 100. Every
row gets the same warm-up and the same measured run. wrk, the system under test and the
upstream share the machine, so compare the ratios of one run, not absolute figures.
"server CPU" is the CPU time the system under test used per second of the measured run
(for (a) the upstream nginx, otherwise the proxy alone; 1.00 = one core busy).

    python bench/transports.py [--duration 10] [--connections 64] [--warmup 2]
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
from common import (
    NGINX_PROXY,
    NGINX_UPSTREAM,
    TRANSPORT_LABELS,
    TRANSPORTS,
    WrkResult,
    environment,
    handle_signals,
    load,
    markdown_table,
    nginx,
    relay,
    wrk,
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(sid: int) -> float:
    """CPU time (user + system) of every live process in session ``sid``."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        # After the command name: state ppid pgrp session ... utime (12th) stime (13th).
        if int(fields[3]) == sid:
            total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


@dataclass(frozen=True)
class Row:
    result: WrkResult
    cpu: float


def check(url: str) -> None:
    response = httpx.get(url, timeout=5, trust_env=False)
    if response.status_code != 200 or len(response.content) != 1024:
        raise RuntimeError(f"{url}: {response.status_code}, {len(response.content)} bytes")


def measure(name: str, url: str, sid: int, args: argparse.Namespace) -> Row:
    check(url)
    if args.warmup:
        wrk(name, url, args.warmup, args.connections)
        time.sleep(0.5)
    before, started = session_cpu_seconds(sid), time.monotonic()
    result = wrk(name, url, args.duration, args.connections)
    cpu = (session_cpu_seconds(sid) - before) / (time.monotonic() - started)
    print(f"  {name}: {result.rps:,.0f} req/s, p99 {result.p99_ms:.2f} ms", flush=True)
    return Row(result, cpu)


def report(rows: list[Row]) -> str:
    direct, via_nginx = rows[0].result, rows[1].result
    header = [
        "system", "req/s", "p50 ms", "p99 ms", "non-2xx", "socket errors",
        "server CPU", "vs direct", "vs nginx proxy",
    ]  # fmt: skip
    table = markdown_table(
        header,
        [
            [
                r.result.name,
                f"{r.result.rps:,.0f}",
                f"{r.result.p50_ms:.2f}",
                f"{r.result.p99_ms:.2f}",
                r.result.non_2xx,
                r.result.socket_errors,
                f"{r.cpu:.2f}",
                f"{r.result.rps / direct.rps:.3f}",
                f"{r.result.rps / via_nginx.rps:.3f}",
            ]
            for r in rows
        ],
    )
    lines = [table, ""]
    by_name = {r.result.name: r.result for r in rows}
    ours = by_name.get(TRANSPORT_LABELS["aiohttp"])
    for other in ("httpcore", "stock"):
        theirs = by_name.get(TRANSPORT_LABELS[other])
        if ours is not None and theirs is not None:
            lines.append(
                f"aiohttp transport vs {other}: {ours.rps / theirs.rps:.2f}x req/s, "
                f"p50 {ours.p50_ms / theirs.p50_ms:.2f}x, p99 {ours.p99_ms / theirs.p99_ms:.2f}x"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=2, help="seconds of warm-up per row")
    args = parser.parse_args()
    handle_signals()
    print(environment())
    print(
        f"1 KiB GET, wrk -t2 -c{args.connections} -d{args.duration}s --latency, "
        f"{args.warmup}s warm-up per row, loopback only\n",
        flush=True,
    )
    rows: list[Row] = []
    with nginx(NGINX_UPSTREAM) as upstream:
        rows.append(measure("straight to nginx upstream", upstream.url("/1k"), upstream.pid, args))
        with nginx(NGINX_PROXY, upstream=upstream.port) as proxy:
            rows.append(measure("nginx reverse proxy, 1 worker", proxy.url("/1k"), proxy.pid, args))
        for transport in TRANSPORTS:
            with relay(upstream.url(""), transport, max_connections=100) as proc:
                name = TRANSPORT_LABELS[transport]
                rows.append(measure(name, proc.url("/1k"), proc.pid, args))
                retries = proc.metrics().sum("relay_upstream_retries_total")
                if retries:
                    print(f"    ({retries:.0f} stale keep-alive retries)")
    print(f"\nload average at the end: {load()}\n")
    print(report(rows))


if __name__ == "__main__":
    main()
