"""The whole performance comparison in one command, on loopback, bounded in time.

    python bench/compare.py [--duration 10] [--warmup 2] [--only a,b,f] [--loads 1,3]
                            [--out bench/results] [--quick] [--baseline REV]

Systems (rows), all against the same upstream in each load:
  (a) straight to the upstream: the ceiling;
  (b) nginx as a streaming reverse proxy (1 worker, upstream keep-alive);
  (c) the naive FastAPI proxy as documented (bench/naive.py: one httpx.AsyncClient with
      httpx's defaults, StreamingResponse), uvicorn 1 worker with uvloop and httptools;
  (d) the same with the httpx-aiohttp package's transport, pool sized like Relay's;
  (e) a minimal raw aiohttp reverse proxy (bench/raw_aiohttp.py);
  (f) Relay, telemetry off: access log off, no OTEL_* variables (metrics are always on);
  (g) Relay, telemetry on as the production overlay ships it: access log on (to a file),
      10% of requests traced (parentbased_traceidratio 0.1), spans exported over OTLP/HTTP
      to a local sink (bench/sink.py);
  (h) Relay, telemetry off, 2 workers (server.workers: 2);
  (i) the naive proxy of (c) with its pool sized like Relay's (all connections kept alive);
  (j) Relay with the access log and every request traced (ratio 1);
  (n), (o) rows (g) and (j) with ``tracing.instrumentation: native``;
  (k), (l), (m) with ``--baseline REV``: rows (f), (g), (j) run from the code of git
      revision REV (say, main before a change), for a before/after in the same run; the
      tables then get a "vs baseline" column.
Rows (d), (e) and (i) get the same upstream pool size as Relay in each load. Rows (i) and
(j) are left out of load 3.

Loads:
  0. the CPU time httpx.AsyncClient.send adds per request to the transport chain it calls
     (bench/client_send.py: in-process, one request at a time, against nginx);
  1. 1 KiB GET, wrk -t2 -c64 (nginx static upstream, 1 worker): req/s, p50, p99, errors;
  2. 1 MiB GET, wrk -t2 -c16 (same upstream): MB/s;
  3. one 1 GiB streamed download (nginx upstream, sendfile, to /dev/null) and one 1 GiB
     streamed upload (curl -T - from a pipe, chunked, to bench/sink.py which reads and
     discards), proxy rows only plus the direct ceiling, row (h) skipped: MB/s and the
     proxy's RSS growth (peak sampled every 20 ms during the transfer, minus before it,
     after one small warm-up transfer);
  4. 100 ms upstream (bench/slow_upstream.py, 2 processes, 1 KiB answers), wrk -t2 -c1000
     --timeout 5s: req/s, p50, p99, errors. Every pool allows 1,000 upstream connections
     (Relay: pool max_connections and max_keepalive_connections 1000, pool timeout 5 s).
     A response slower than 5 s counts as a socket error (timeout), not a latency sample;
     requests still unanswered when wrk stops are not counted at all, so a system that
     collapses shows as a low req/s.
Every wrk row gets ``--warmup`` seconds of the same load first. wrk, the systems and the
upstream share the machine: compare the ratios of one run, not absolute figures.
Results: a Markdown table per load on stdout, and latest.csv, latest.json, latest.png in
``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from functools import partial
from importlib.util import find_spec
from pathlib import Path
from subprocess import SubprocessError
from typing import Any

import httpx
from common import (
    BENCH,
    LOOPBACK,
    NGINX_UPSTREAM,
    Served,
    baseline_source,
    environment,
    free_port,
    handle_signals,
    load,
    nginx,
    process,
    wait_ready,
)
from loads import MIB, transfer, wrk_load
from report import (
    add_ratios,
    send_table,
    transfer_table,
    write_chart,
    write_csv,
    write_json,
    wrk_table,
)
from systems import SYSTEMS, Context, System, baseline_systems, select

# Rows whose spans go to the OTLP sink: their exported span counts are noted.
TRACED_ROWS = {
    "relay-telemetry",
    "relay-traced",
    "relay-native",
    "relay-native-traced",
    "baseline-telemetry",
    "baseline-traced",
}
NGINX_SENDFILE_UPSTREAM = NGINX_UPSTREAM.replace("access_log off;", "access_log off; sendfile on;")
LOADS = {"0": "send", "1": "small", "2": "mib", "3": "stream", "4": "slow"}
TITLES = {
    "send": "Load 0: what httpx.AsyncClient.send costs over the transport chain (1 KiB GET)",
    "small": "Load 1: 1 KiB GET",
    "mib": "Load 2: 1 MiB GET",
    "stream": "Load 3: 1 GiB streamed download and upload",
    "slow": "Load 4: 100 ms upstream, 1,000 connections",
}


@contextmanager
def sink() -> Iterator[Served]:
    port = free_port()
    with process([sys.executable, str(BENCH / "sink.py"), "--port", str(port)]) as proc:
        wait_ready(f"http://{LOOPBACK}:{port}/stats", proc)
        yield Served(port, proc.pid)


@contextmanager
def slow_upstream(delay_ms: float, processes: int) -> Iterator[Served]:
    port = free_port()
    args = [
        sys.executable,
        str(BENCH / "slow_upstream.py"),
        "--port",
        str(port),
        "--delay-ms",
        str(delay_ms),
        "--processes",
        str(processes),
    ]
    with process(args) as proc:
        wait_ready(f"http://{LOOPBACK}:{port}/", proc)
        yield Served(port, proc.pid)


def spans(otlp: Served) -> int:
    stats = httpx.get(otlp.url("/stats"), timeout=5, trust_env=False).json()
    return int(stats["spans"])


class Run:
    """One comparison: the settings, the OTLP sink, and the records collected so far."""

    def __init__(self, args: argparse.Namespace, systems: list[System], otlp: Served) -> None:
        self.args = args
        self.systems = systems
        self.otlp = otlp
        self.results: list[dict[str, Any]] = []
        self.notes: list[str] = []
        self.send_costs: dict[str, float] = {}

    def context(self, upstream: Served, pool: int) -> Context:
        return Context(upstream, pool, self.otlp.url(""))

    def record(
        self, load: str, system: System, measure: Callable[[Served], dict[str, Any]], ctx: Context
    ) -> None:
        """Start the system, measure it, stop it; a failure is recorded, not fatal."""
        record: dict[str, Any] = {
            "load": load,
            "row": system.key,
            "system": system.id,
            "label": system.label,
            # The machine is shared: what else ran shows in the load average.
            "load_1m": round(os.getloadavg()[0], 2),
        }
        spans_before = spans(self.otlp)
        try:
            with system.start(ctx) as served:
                record.update(measure(served))
        except (RuntimeError, ValueError, OSError, SubprocessError, httpx.HTTPError) as exc:
            record["error"] = str(exc).splitlines()[0][:120]
        self.results.append(record)
        if system.id in TRACED_ROWS and not record.get("error"):
            # Read after the stop: shutting down flushes the last batch of spans.
            exported = spans(self.otlp) - spans_before
            record["spans_exported"] = exported
            self.notes.append(
                f"{load}: row ({system.key}) exported {exported:,} spans to the OTLP sink"
            )
        summary = record.get("error") or ", ".join(
            f"{k} {record[k]:,.1f}"
            for k in ("rps", "mb_per_s", "p99_ms", "rss_growth_mib")
            if k in record
        )
        print(f"  {load:8} ({system.key}) {system.label}: {summary}", flush=True)

    def wrk_rows(
        self,
        load: str,
        upstream: Served,
        path: str,
        body: int,
        connections: int,
        pool: int,
        timeout: int | None = None,
    ) -> None:
        ctx = self.context(upstream, pool)
        measure = partial(
            wrk_load,
            load,
            path=path,
            body=body,
            duration=self.args.duration,
            warmup=self.args.warmup,
            connections=connections,
            timeout=timeout,
        )
        for system in self.systems:
            self.record(load, system, measure, ctx)

    def small(self) -> None:
        with nginx(NGINX_UPSTREAM, files={"1k": 1024, "1m": MIB}) as upstream:
            self.wrk_rows("small", upstream, "/1k", 1024, 64, self.args.pool)

    def mib(self) -> None:
        with nginx(NGINX_UPSTREAM, files={"1k": 1024, "1m": MIB}) as upstream:
            self.wrk_rows("mib", upstream, "/1m", MIB, 16, self.args.pool)

    def stream(self) -> None:
        size, warm = self.args.size_mib * MIB, 16 * MIB
        files = {"big": size, "warm": warm}
        skipped = {"relay-2w", "naive-pooled", "relay-traced", "relay-native-traced"}
        skipped |= {"baseline-traced"}
        systems = [s for s in self.systems if s.id not in skipped]
        if left_out := [s.key for s in self.systems if s.id in skipped]:
            self.notes.append(
                f"stream: rows {', '.join(left_out)} skipped (one transfer uses one worker; "
                "(c) and (g) already cover the naive proxy and telemetry)"
            )
        for direction in ("download", "upload"):
            upstreams = (
                nginx(NGINX_SENDFILE_UPSTREAM, files=files) if direction == "download" else sink()
            )
            with upstreams as upstream:
                if direction == "download":
                    # The first read of the sparse file fills the page cache.
                    transfer(
                        "download",
                        upstream,
                        "/big",
                        size=size,
                        warm_size=warm,
                        max_time=self.args.max_time,
                    )
                ctx = self.context(upstream, self.args.pool)
                measure = partial(
                    transfer,
                    direction,
                    path="/big",
                    size=size,
                    warm_size=warm,
                    max_time=self.args.max_time,
                )
                for system in systems:
                    self.record(direction, system, measure, ctx)

    def send(self) -> None:
        """In one process, one request at a time: bench/client_send.py."""
        with nginx(NGINX_UPSTREAM, files={"1k": 1024}) as upstream:
            args = [sys.executable, str(BENCH / "client_send.py"), "--json"]
            args += ["--upstream", upstream.url("/1k")]
            done = subprocess.run(args, capture_output=True, text=True, check=True, timeout=600)
        self.send_costs = json.loads(done.stdout)
        print(f"  send     {self.send_costs}", flush=True)

    def slow(self) -> None:
        with slow_upstream(self.args.slow_delay_ms, self.args.slow_processes) as upstream:
            self.wrk_rows(
                "slow",
                upstream,
                "/",
                1024,
                self.args.slow_connections,
                self.args.slow_connections,
                timeout=self.args.slow_timeout,
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, help="seconds per measured wrk run (10)")
    parser.add_argument("--warmup", type=int, help="seconds of wrk warm-up per row (2)")
    parser.add_argument("--only", help="rows to run, letters or ids, e.g. a,b,f or relay")
    parser.add_argument(
        "--baseline", help="git revision whose Relay runs as rows k, l, m (e.g. main)"
    )
    parser.add_argument("--loads", default="0,1,2,3,4", help="loads to run, e.g. 1,4")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 2 s runs, 1 s warm-up, 128 MiB transfers"
    )
    parser.add_argument("--size-mib", type=int, help="load 3 transfer size (1024)")
    parser.add_argument("--max-time", type=int, default=120, help="per transfer, seconds")
    parser.add_argument("--pool", type=int, default=100, help="upstream pool, loads 1-3")
    parser.add_argument("--slow-connections", type=int, default=1000)
    parser.add_argument("--slow-delay-ms", type=float, default=100.0)
    parser.add_argument("--slow-processes", type=int, default=2)
    parser.add_argument(
        "--slow-timeout", type=int, default=5, help="load 4: wrk --timeout, seconds"
    )
    args = parser.parse_args(argv)
    quick = args.quick
    for name, full, short in (("duration", 10, 2), ("warmup", 2, 1), ("size_mib", 1024, 128)):
        if getattr(args, name) is None:
            setattr(args, name, short if quick else full)
    loads = [n.strip() for n in args.loads.split(",") if n.strip()]
    if unknown := [n for n in loads if n not in LOADS and n not in LOADS.values()]:
        parser.error(f"unknown loads {unknown}; known: 0-4 or {', '.join(LOADS.values())}")
    args.load_names = [name for key, name in LOADS.items() if key in loads or name in loads]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    handle_signals()
    with ExitStack() as stack:
        available = list(SYSTEMS)
        if args.baseline:
            source = stack.enter_context(baseline_source(args.baseline))
            available += baseline_systems(args.baseline, lambda: source)
        compare(args, argv, select(args.only, available))


def compare(args: argparse.Namespace, argv: list[str] | None, systems: list[System]) -> None:
    if find_spec("httpx_aiohttp") is None:
        print("httpx-aiohttp is not installed: row (d) skipped (pip install -e '.[bench]')")
        systems = [s for s in systems if s.id != "naive-aiohttp"]
    args.out.mkdir(parents=True, exist_ok=True)
    env = environment()
    started = datetime.now(UTC)
    print(env)
    print(
        f"rows {', '.join(s.key for s in systems)}; loads {', '.join(args.load_names)}; "
        f"wrk {args.duration} s + {args.warmup} s warm-up; transfers {args.size_mib} MiB; "
        f"pools {args.pool} (loads 1-3) / {args.slow_connections} (load 4)\n",
        flush=True,
    )
    clock = time.monotonic()
    with sink() as otlp:
        run = Run(args, systems, otlp)
        for name in args.load_names:
            getattr(run, name)()
    elapsed = time.monotonic() - clock
    add_ratios(run.results)
    print(f"\ndone in {elapsed:.0f} s; load average at the end: {load()}")
    for name in args.load_names:
        print(f"\n{TITLES[name]}\n")
        if name == "send":
            print(send_table(run.send_costs))
        else:
            print(transfer_table(run.results) if name == "stream" else wrk_table(run.results, name))
    for note in run.notes:
        print(f"note: {note}")
    write_csv(args.out / "latest.csv", run.results)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    write_json(
        args.out / "latest.json",
        {
            "started": started.isoformat(timespec="seconds"),
            "seconds": round(elapsed),
            "command": " ".join(["python", "bench/compare.py", *(argv or sys.argv[1:])]),
            "environment": env,
            "settings": settings,
            "systems": {s.key: s.label for s in systems},
            "notes": run.notes,
            "send_cpu_us_per_request": run.send_costs,
            "results": run.results,
        },
    )
    title = f"{started:%Y-%m-%d %H:%M} UTC, loopback only. {env}"
    write_chart(args.out / "latest.png", run.results, title)
    written = ", ".join(str(args.out / n) for n in ("latest.csv", "latest.json", "latest.png"))
    print(f"\nwritten: {written}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        # Every process was already stopped while the stack unwound.
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
