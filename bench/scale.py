"""Relay at platform size: start-up, routing, scrapes and idle connections, on loopback.

    python bench/scale.py [--parts startup,routes,scrape,idle] [--upstreams 1,100,1000,10000]
                          [--routes 1,100,1000,10000] [--repeat 3] [--rounds 3] [--duration 5]
                          [--connections 10000] [--json FILE]

Relay runs as its own process with a generated config (one worker unless told, access log
off), so this runs unchanged against any revision of ``service/``. Parts:

  startup  N upstreams, each with its own route and its own ``http://127.0.0.1:<port>``
           (nothing is sent to them): seconds from spawning the process to ``/readyz``
           answering 200, and RSS then; median of ``--repeat`` starts. A start is stopped
           past ``--start-timeout`` or ``--max-rss-mb``, and larger sizes are then skipped.
  routes   N prefix routes of equal length (``/svc00000`` ...) to one nginx upstream
           (1 KiB), every request for the last route in config order: the last one a
           linear scan reaches. wrk -c64; every size once per round, ``--rounds`` rounds
           in the same run, medians; ratio to the smallest size.
  scrape   ``--scrape-upstreams`` upstreams and routes after one request to each (the last
           few point to a closed port: 502s) and one to no route (404), with 1 and 2
           workers: /metrics time, bytes and series, text format and OpenMetrics.
  idle     RSS and open fds of Relay at rest, with ``--connections`` client connections
           open before any request, after one request on each (keep-alive), and after
           ``--idle-wait`` s more; the latency of a request on a new connection each time.

Every wait is bounded; every process started is stopped on exit, Ctrl-C or SIGTERM.
Results: one Markdown table per part on stdout; ``--json FILE`` writes them too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import idle_clients
from common import NGINX_UPSTREAM, environment, handle_signals, markdown_table, nginx, wrk
from loads import check
from scale_relay import (
    FORMATS,
    MB,
    StartFailed,
    max_open_files,
    measure_scrape,
    routes_config,
    scaled_relay,
    traffic,
    upstreams_config,
    worst_path,
)

DEAD_UPSTREAMS = 10  # of the scrape part's upstreams: a closed port, so 502 connect errors
# Connections of the latency samples may still be closing when the fds at rest are counted.
SLACK = 5


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def mb(kib: int) -> str:
    return f"{kib * 1024 / MB:,.0f}"


def bounds(args: argparse.Namespace) -> dict[str, Any]:
    return {"timeout": args.start_timeout, "max_rss_mb": args.max_rss_mb}


# -- start-up ------------------------------------------------------------------------------


def part_startup(args: argparse.Namespace) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []
    failed = ""
    for count in args.upstreams:
        result: dict[str, Any] = {"upstreams": count, "runs": []}
        results.append(result)
        if failed:
            result["failed"] = f"skipped ({failed})"
            continue
        for _ in range(args.repeat):
            try:
                with scaled_relay(upstreams_config(count), **bounds(args)) as relay:
                    result["runs"].append([relay.ready_seconds, relay.ready_rss_kib])
            except StartFailed as exc:
                result["failed"] = failed = f"{count:,} upstreams: {exc}"
                break
            log(f"startup {count:,}: ready in {relay.ready_seconds:.2f} s")
        if result["runs"] and "failed" not in result:
            result["seconds"] = statistics.median(run[0] for run in result["runs"])
            result["rss_kib"] = statistics.median(run[1] for run in result["runs"])
    return results


def startup_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if "seconds" in r), None)
    rows = []
    for r in results:
        if "seconds" not in r:
            rows.append([f"{r['upstreams']:,}", r["failed"], "", "", "", ""])
            continue
        added = r["upstreams"] - base["upstreams"] if base else 0
        per_ms = per_kb = "-"
        if base and added > 0:
            per_ms = f"{(r['seconds'] - base['seconds']) * 1000 / added:.2f}"
            per_kb = f"{(r['rss_kib'] - base['rss_kib']) * 1024 / 1000 / added:,.1f}"
        runs = ", ".join(f"{run[0]:.2f}" for run in r["runs"])
        rows.append(
            [f"{r['upstreams']:,}", f"{r['seconds']:.2f}", mb(r["rss_kib"]), per_ms, per_kb, runs]
        )
    header = ["upstreams", "ready after (s)", "RSS (MB)", "ms / upstream", "KB / upstream"]
    return markdown_table([*header, "each start (s)"], rows)


# -- routes --------------------------------------------------------------------------------


def part_routes(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = [{"routes": count, "path": worst_path(count), "runs": []} for count in args.routes]
    with nginx(NGINX_UPSTREAM, files={"1k": 1024}) as upstream, ExitStack() as stack:
        relays = {}
        for result in results:
            count = result["routes"]
            try:
                config = routes_config(count, upstream.url(""))
                relay = stack.enter_context(scaled_relay(config, **bounds(args)))
            except StartFailed as exc:
                result["failed"] = str(exc)
                continue
            relays[count] = relay.url(worst_path(count))
            result.update(ready_seconds=relay.ready_seconds, rss_kib=relay.ready_rss_kib)
            check(relays[count], 1024)
            if args.warmup:
                wrk(f"warm-up {count}", relays[count], args.warmup)
            log(f"routes {count:,}: ready in {relay.ready_seconds:.2f} s")
        measured = [result for result in results if result["routes"] in relays]
        for round_ in range(args.rounds):
            # Alternate the order so no size always runs first or last in a round.
            for result in measured if round_ % 2 == 0 else measured[::-1]:
                url = relays[result["routes"]]
                result["runs"].append(wrk(url, url, args.duration, connections=64))
            log(f"routes: round {round_ + 1} of {args.rounds} done")
    for result in results:
        runs = result.pop("runs")
        if not runs:
            continue
        result["rps"] = statistics.median(run.rps for run in runs)
        result["p99_ms"] = statistics.median(run.p99_ms for run in runs)
        result["rps_runs"] = [run.rps for run in runs]
        result["errors"] = sum(run.non_2xx + run.socket_errors for run in runs)
    return results


def routes_table(results: list[dict[str, Any]]) -> str:
    base = next((r for r in results if "rps" in r), None)
    rows = []
    for r in results:
        if "rps" not in r:
            rows.append([f"{r['routes']:,}", r.get("failed", "-"), "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                f"{r['routes']:,}",
                f"`{r['path']}`",
                f"{r['rps']:,.0f}",
                f"{r['p99_ms']:,.2f}",
                f"{r['rps'] / base['rps']:.3f}" if base and base["rps"] else "-",
                ", ".join(f"{rps:,.0f}" for rps in r["rps_runs"]),
                r["errors"],
                f"{r['ready_seconds']:.2f}",
                mb(r["rss_kib"]),
            ]
        )
    vs = f"vs {base['routes']:,} route{'s' if base['routes'] != 1 else ''}" if base else "vs"
    header = ["routes", "request (worst case)", "req/s", "p99 ms", vs, "req/s per round"]
    return markdown_table([*header, "errors", "ready after (s)", "RSS (MB)"], rows)


# -- scrape --------------------------------------------------------------------------------


def part_scrape(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    count = args.scrape_upstreams
    with nginx(NGINX_UPSTREAM, files={"1k": 1024}) as upstream:
        for workers in args.scrape_workers:
            config = upstreams_config(count, upstream.url(""), dead=min(DEAD_UPSTREAMS, count))
            result: dict[str, Any] = {"workers": workers, "upstreams": count}
            results.append(result)
            try:
                with scaled_relay(config, workers=workers, **bounds(args)) as relay:
                    result["ready_seconds"] = relay.ready_seconds
                    result["statuses"] = dict(sorted(traffic(relay, count).items()))
                    for name, accept in FORMATS.items():
                        result[name] = measure_scrape(relay.admin("/metrics"), accept, args.scrapes)
            except StartFailed as exc:
                result["failed"] = str(exc)
            log(f"scrape, {workers} worker(s): done")
    return results


def scrape_table(results: list[dict[str, Any]]) -> str:
    rows = []
    for r in results:
        for name in FORMATS:
            if "failed" in r:
                rows.append([r["workers"], name, r["failed"], "", "", "", ""])
                continue
            s = r[name]
            rows.append(
                [
                    r["workers"],
                    name,
                    f"{s['ms']:,.0f}",
                    f"{s['max_ms']:,.0f}",
                    f"{s['bytes']:,}",
                    f"{s['series']:,}",
                    f"`{s['content_type'].split(';')[0]}`",
                ]
            )
    header = ["workers", "format", "scrape ms (median)", "max ms", "bytes", "series"]
    return markdown_table([*header, "content type"], rows)


def scrape_notes(results: list[dict[str, Any]]) -> str:
    lines = []
    for r in results:
        if "failed" in r:
            continue
        statuses = ", ".join(f"{n:,} x {code}" for code, n in r["statuses"].items())
        top = ", ".join(f"{name} {n:,}" for name, n in r["text"]["top_families"])
        lines.append(
            f"- {r['workers']} worker(s), ready in {r['ready_seconds']:.1f} s; traffic before "
            f"the scrapes: {statuses}; most series (text): {top}"
        )
    return "\n".join(lines)


# -- idle connections ----------------------------------------------------------------------


def part_idle(args: argparse.Namespace) -> dict[str, Any]:
    limit = idle_clients.raise_fd_limit()
    count = min(args.connections, limit - 200)
    parts = {
        "upstreams": {"up": {}},
        "routes": [{"prefix": "/up", "upstream": "up", "strip_prefix": True}],
    }
    with nginx(NGINX_UPSTREAM, files={"1k": 1024}) as upstream:
        parts["upstreams"]["up"]["url"] = upstream.url("")
        with scaled_relay(parts, **bounds(args)) as relay:
            idle_clients.new_request_ms(relay.port, "/up/1k", samples=50)  # warm
            rest = idle_clients.snapshot(relay, "at rest", None, 0)
            rows = [rest]
            socks = idle_clients.connect(
                relay.port,
                count,
                lambda opened: idle_clients.settle(relay.pid, rest["fds"] + opened - SLACK),
            )
            try:
                label = f"{count:,} connected, no request yet"
                rows.append(idle_clients.snapshot(relay, label, rest, count))
                started = time.monotonic()
                statuses = idle_clients.one_request_each(socks, "/up/1k")
                took = time.monotonic() - started
                label = f"{count:,} after one request each"
                rows.append(
                    idle_clients.snapshot(relay, label, rest, idle_clients.still_open(socks))
                )
                if args.idle_wait:
                    time.sleep(args.idle_wait)
                    label = f"{args.idle_wait:g} s later"
                    rows.append(
                        idle_clients.snapshot(relay, label, rest, idle_clients.still_open(socks))
                    )
            finally:
                idle_clients.close(socks)
            relay_limit = max_open_files(relay.pid)
    return {
        "connections": count,
        "fd_limit": limit,
        "relay_fd_limit": relay_limit,
        "statuses": dict(statuses),
        "requests_seconds": took,
        "rows": rows,
    }


def idle_table(result: dict[str, Any]) -> str:
    rows = [
        [
            r["state"],
            f"{r['clients']:,}",
            mb(r["rss_kib"]),
            f"{r['fds']:,}",
            f"{r['kb_per_connection']:.1f}" if "kb_per_connection" in r else "-",
            "{:.2f} / {:.2f}".format(*r["new_request_ms"]),
        ]
        for r in result["rows"]
    ]
    header = ["client connections", "open", "RSS (MB)", "Relay fds", "KB / connection"]
    return markdown_table([*header, "new request ms (median / max)"], rows)


# -- main ----------------------------------------------------------------------------------

PARTS = {
    "startup": (part_startup, startup_table, "Start-up: N upstreams, one route each, one worker"),
    "routes": (part_routes, routes_table, "Routes: N prefix routes, request for the worst case"),
    "scrape": (part_scrape, scrape_table, "Scrape: /metrics after traffic to every route"),
    "idle": (part_idle, idle_table, "Idle client connections, one worker"),
}


def sizes(text: str) -> list[int]:
    return [int(part.replace("_", "")) for part in text.split(",") if part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--upstreams", type=sizes, default=[1, 100, 1_000, 10_000])
    parser.add_argument("--routes", type=sizes, default=[1, 100, 1_000, 10_000])
    parser.add_argument("--repeat", type=int, default=3, help="starts per size (median)")
    parser.add_argument("--start-timeout", type=float, default=60, help="s, per start")
    parser.add_argument("--max-rss-mb", type=int, default=3000, help="stop a start beyond")
    parser.add_argument("--rounds", type=int, default=3, help="routes: rounds of wrk runs")
    parser.add_argument("--duration", type=int, default=5, help="routes: s per wrk run")
    parser.add_argument("--warmup", type=int, default=1, help="routes: s of wrk first")
    parser.add_argument("--scrape-upstreams", type=int, default=1_000)
    parser.add_argument("--scrape-workers", type=sizes, default=[1, 2])
    parser.add_argument("--scrapes", type=int, default=5, help="timed scrapes per format")
    parser.add_argument("--connections", type=int, default=10_000, help="idle: client conns")
    parser.add_argument("--idle-wait", type=float, default=6, help="idle: s before a last look")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    chosen = [part for part in args.parts.split(",") if part]
    if unknown := set(chosen) - set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    handle_signals()
    # Before anything starts, so Relay inherits the raised limit too.
    fd_limit = idle_clients.raise_fd_limit()
    results: dict[str, Any] = {"environment": environment(), "fd_limit": fd_limit}
    print(f"# Relay at scale (bench/scale.py)\n\n{results['environment']}")
    print(f"Open files limit of this process and Relay: {fd_limit:,}\n")
    for name in chosen:
        run, table, title = PARTS[name]
        started = time.monotonic()
        results[name] = run(args)
        print(f"**{title}** ({time.monotonic() - started:.0f} s)\n\n{table(results[name])}\n")
        print(NOTES[name](args, results[name]) + "\n", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


NOTES = {
    "startup": lambda args, r: (
        f"Median of {args.repeat} starts; from spawning `python -m service` to `/readyz` 200 "
        f"on the admin port; RSS of the process then. Per upstream: (row - first row) / "
        f"(upstreams added). A start is stopped at {args.start_timeout:g} s or "
        f"{args.max_rss_mb:,} MB; larger sizes are then skipped."
    ),
    "routes": lambda args, r: (
        f"Worst case for a linear scan: all prefixes the same length (`/svc00000` ...), so "
        f"they keep config order and the request is for the last route. 1 KiB from nginx, "
        f"wrk -t2 -c64, {args.duration} s per run, {args.rounds} rounds (order alternating), "
        f"medians; all sizes run side by side in this run. Errors: non-2xx responses and "
        f"socket errors (a response slower than wrk's 2 s timeout is one)."
    ),
    "scrape": lambda args, r: scrape_notes(r),
    "idle": lambda args, r: (
        f"Client connections opened by this process (open files limit raised to "
        f"{r['fd_limit']:,}; Relay's: {r['relay_fd_limit']}), {idle_clients.BATCH} at a "
        f"time; then one `GET /up/1k` on each ({r['statuses']}, {r['requests_seconds']:.1f} s). "
        f"Open: client connections Relay has not closed; it closes an idle keep-alive "
        f"connection after its keep-alive timeout (last row), so those answered longer "
        f"before are gone by the third row. KB / connection: (RSS - at rest) / open. Relay "
        f"fds include its upstream pool's connections. A new request: connect, 1 KiB GET, "
        f"full response; 20 samples."
    ),
}


if __name__ == "__main__":
    main()
