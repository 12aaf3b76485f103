"""Soak: hours-of-traffic behaviour in minutes. Is memory flat, do fds and pools come back?

Starts Relay as its own process (``--workers``, 1 by default) in front of three upstreams
served by this script on loopback, and a fourth with nothing listening:

  healthy  /fast/...: 1 KiB at once; POST echoes the body
  slow     /slow/...: answers after 20-200 ms; /slow/stream: 32 chunks of 1 KiB over ~0.3 s
  faulty   /faulty/...: per request at random: answers, resets before the response, resets
           mid-body, or hangs until Relay's read timeout (1 s)
  refused  /refused/...: an upstream whose port has nothing listening

and drives a mix of GETs, POST bodies, streams, clients hanging up mid-request-body and
mid-response, and requests hitting the faults, at ``--rate`` requests per second with at
most ``--concurrency`` in flight, for ``--duration`` seconds. Every ``--interval`` seconds it
prints Relay's resident memory and open fds (psutil, workers included) and, from /metrics,
the pools (in use, idle, waiting) and the requests so far by status. Then it stops the
traffic, waits for quiescence, and checks:

  memory flat   RSS growth from the first sample after ``--warmup`` to the end is below
                ``--max-growth-mib``, and the mean of the last third of the samples is
                within ``--max-trend-mib`` of the mean of the middle third (no upward trend)
  fds           back to the count before any traffic (idle upstream connections expire);
                with several workers only sockets are compared, as each worker opens its
                metrics files when it first counts something
  pools         0 in use, 0 waiting, no request in flight
  correctness   every request to a healthy upstream answered 200 with the right body, to
                the refusing one 502
  shutdown      SIGTERM: Relay drains and exits 0

The exit code is 0 when every check passes, 1 otherwise. ``--json FILE`` writes the samples
and the checks. Everything binds 127.0.0.1, is bounded in time, and every process started
is stopped on exit, Ctrl-C or SIGTERM.

    python bench/soak.py [--duration 180] [--rate 150] [--workers 1] [--json FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from common import (
    LOOPBACK,
    ROOT,
    ScrapedSamples,
    environment,
    free_port,
    handle_signals,
    markdown_table,
    process,
    server_section,
    wait_ready,
)
from soak_upstreams import BODY_1K, CHUNK, MIB, STREAM_CHUNKS, faulty, healthy, serve, slow

# -- Relay ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RelayUnderTest:
    url: str
    admin_url: str
    process: psutil.Process

    def tree(self) -> list[psutil.Process]:
        """Relay and, with several workers, its worker processes."""
        with contextlib.suppress(psutil.NoSuchProcess):
            return [self.process, *self.process.children(recursive=True)]
        return []

    def rss(self) -> int:
        return sum(_quietly(lambda p=p: p.memory_info().rss) for p in self.tree())

    def fds(self) -> int:
        return sum(_quietly(p.num_fds) for p in self.tree())

    def sockets(self) -> int:
        return sum(_quietly(lambda p=p: len(p.net_connections("all"))) for p in self.tree())

    async def metrics(self, client: httpx.AsyncClient) -> ScrapedSamples:
        return ScrapedSamples.parse((await client.get(f"{self.admin_url}/metrics")).text)


def _quietly(read: Callable[[], int]) -> int:
    try:
        return read()
    except psutil.NoSuchProcess:  # a worker that just exited
        return 0


def relay_config(
    ports: dict[str, int], port: int, admin: int, workers: int, transport: str
) -> dict[str, Any]:
    def upstream(name: str, read: float) -> dict[str, Any]:
        return {
            "url": f"http://{LOOPBACK}:{ports[name]}",
            "transport": transport,
            "pool": {
                "max_connections": 64,
                "max_keepalive_connections": 32,
                # Short, so that idle connections are gone by the end of the quiescence wait
                # and the fd count can be compared with the one before any traffic.
                "keepalive_expiry_seconds": 2,
            },
            "timeouts": {"connect": 2, "read": read, "write": 5, "pool": 5},
        }

    return {
        "server": server_section(port, admin, workers, drain=0.5, grace=10),
        "log": {"access_log": False, "level": "WARNING"},
        "upstreams": {
            "healthy": upstream("healthy", 10),
            "slow": upstream("slow", 10),
            "faulty": upstream("faulty", 1),
            "refused": upstream("refused", 1),
        },
        "routes": [
            {"prefix": "/fast", "upstream": "healthy"},
            {"prefix": "/slow", "upstream": "slow"},
            {"prefix": "/faulty", "upstream": "faulty"},
            {"prefix": "/refused", "upstream": "refused"},
        ],
    }


@contextmanager
def relay(
    ports: dict[str, int], tmp: Path, workers: int, transport: str
) -> Iterator[tuple[RelayUnderTest, Callable[[], int]]]:
    port, admin = free_port(), free_port()
    path = tmp / "relay.yaml"
    path.write_text(yaml.safe_dump(relay_config(ports, port, admin, workers, transport)))
    env = {"PYTHONPATH": str(ROOT), "OTEL_SDK_DISABLED": "true"}
    # prometheus-client goes multiprocess when the variable is set at all, even empty (it
    # would write its files to the working directory): one worker must not see it.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    if workers > 1:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(tmp / "prometheus")
    log = tmp / "relay.log"
    args = [sys.executable, "-m", "service", "--config", str(path)]
    with process(args, env=env, log=log) as proc:
        try:
            wait_ready(f"http://{LOOPBACK}:{admin}/readyz", proc)
        except RuntimeError:
            sys.stderr.write(log.read_text(errors="replace")[-4000:])
            raise

        def stop() -> int:
            """SIGTERM and wait for the drain: the exit code, or -1 if it hangs."""
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout=30)
            except Exception:
                return -1

        served = RelayUnderTest(
            f"http://{LOOPBACK}:{port}", f"http://{LOOPBACK}:{admin}", psutil.Process(proc.pid)
        )
        yield served, stop


# -- traffic --------------------------------------------------------------------------------


@dataclass
class Tally:
    """What the clients saw, by kind of request."""

    sent: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    wrong: Counter[str] = field(default_factory=Counter)  # healthy routes: not 200 + right body
    wrong_examples: list[str] = field(default_factory=list)

    def mismatch(self, kind: str, what: str) -> None:
        self.wrong[kind] += 1
        if len(self.wrong_examples) < 10:
            self.wrong_examples.append(f"{kind}: {what}")


async def raw_hang_up(url: str, path: str, mode: str) -> None:
    """A client that hangs up mid-request-body or mid-response."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        if mode == "body":
            writer.write(
                f"POST {path} HTTP/1.1\r\nhost: soak\r\ncontent-length: 65536\r\n\r\n".encode()
                + b"b" * random.randint(1, 32768)
            )
            await writer.drain()
            await asyncio.sleep(random.uniform(0, 0.05))
        else:
            writer.write(f"GET {path} HTTP/1.1\r\nhost: soak\r\n\r\n".encode())
            await writer.drain()
            await asyncio.wait_for(reader.read(random.randint(100, 8000)), 10)
    finally:
        writer.transport.abort()


async def one_request(client: httpx.AsyncClient, url: str, tally: Tally) -> None:
    kind = random.choices(
        ("get", "post", "slow", "stream", "faulty", "refused", "hangup_body", "hangup_stream"),
        weights=(30, 15, 10, 10, 20, 5, 5, 5),
    )[0]
    tally.sent[kind] += 1
    if kind.startswith("hangup_"):
        mode, path = ("body", "/fast/echo") if kind == "hangup_body" else ("stream", "/slow/stream")
        with contextlib.suppress(OSError, TimeoutError):
            await raw_hang_up(url, path, mode)
        return
    body = os.urandom(random.randint(1, 64 * 1024)) if kind == "post" else None
    path = {
        "get": "/fast/x",
        "post": "/fast/echo",
        "slow": "/slow/x",
        "stream": "/slow/stream",
        "faulty": "/faulty/x",
        "refused": "/refused/x",
    }[kind]
    try:
        reply = await client.request("POST" if body else "GET", url + path, content=body)
    except httpx.HTTPError as exc:
        # A fault after the headers (the faulty upstream resetting mid-body) must cut the
        # response; anywhere else an exception is wrong.
        tally.statuses["cut" if kind == "faulty" else "error"] += 1
        if kind != "faulty":
            tally.mismatch(kind, f"{type(exc).__name__}: {exc}")
        return
    tally.statuses[str(reply.status_code)] += 1
    expected = {
        "get": BODY_1K,
        "post": body,
        "slow": BODY_1K,
        "stream": CHUNK * STREAM_CHUNKS,
    }.get(kind)
    if expected is not None and (reply.status_code != 200 or reply.content != expected):
        tally.mismatch(kind, f"status {reply.status_code}, {len(reply.content)} bytes")
    elif kind == "refused" and reply.status_code != 502:
        tally.mismatch(kind, f"status {reply.status_code}")


async def drive(url: str, rate: float, concurrency: int, until: float, tally: Tally) -> None:
    """Start a request every 1/rate s (Poisson arrivals), at most ``concurrency`` at once:
    when all are busy the next start waits, so the offered load is bounded."""
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(30)
    running: set[asyncio.Task[None]] = set()
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:

        async def run() -> None:
            try:
                await one_request(client, url, tally)
            except Exception as exc:  # counted, so that a verdict never hides it
                tally.mismatch("driver", repr(exc))
            finally:
                slots.release()

        while time.monotonic() < until:
            await asyncio.sleep(random.expovariate(rate))
            await slots.acquire()
            task = asyncio.create_task(run())
            running.add(task)
            task.add_done_callback(running.discard)
        await asyncio.gather(*running, return_exceptions=True)


# -- sampling and verdict -------------------------------------------------------------------


@dataclass
class Sample:
    t: float
    rss_mib: float
    fds: int
    sockets: int
    in_use: float
    idle: float
    waiting: float
    in_flight: float
    requests: int
    codes: dict[str, int]
    workers: int = 1


def fds_back(now: Sample, before: Sample) -> bool:
    if before.workers > 1:
        return now.sockets <= before.sockets
    return now.fds <= before.fds and now.sockets <= before.sockets


async def sample(relay: RelayUnderTest, client: httpx.AsyncClient, started: float) -> Sample:
    m = await relay.metrics(client)
    codes: Counter[str] = Counter()
    for (name, labels), value in m.samples.items():
        if name == "relay_requests_total":
            codes[dict(labels)["code"]] += int(value)
    return Sample(
        t=round(time.monotonic() - started, 1),
        rss_mib=round(relay.rss() / MIB, 2),
        fds=relay.fds(),
        sockets=relay.sockets(),
        in_use=m.sum("relay_pool_connections", state="in_use"),
        idle=m.sum("relay_pool_connections", state="idle"),
        waiting=m.sum("relay_pool_waiting_requests"),
        in_flight=m.sum("relay_requests_in_flight"),
        requests=sum(codes.values()),
        codes=dict(sorted(codes.items())),
    )


def show(s: Sample) -> str:
    mix = " ".join(f"{code}:{n}" for code, n in s.codes.items())
    return (
        f"t={s.t:7.1f}s  rss={s.rss_mib:7.2f} MiB  fds={s.fds:4d} ({s.sockets:3d} sockets)  "
        f"pool in_use={s.in_use:3.0f} idle={s.idle:3.0f} waiting={s.waiting:3.0f}  "
        f"in_flight={s.in_flight:3.0f}  requests={s.requests}  [{mix}]"
    )


@dataclass
class SoakCheck:
    name: str
    ok: bool
    detail: str


def verdict(
    samples: list[Sample],
    warm: Sample,
    end: Sample,
    end_rss_mib: float,
    baseline: Sample,
    tally: Tally,
    exit_code: int,
    max_growth: float,
    max_trend: float,
) -> list[SoakCheck]:
    during = [s for s in samples if s.t >= warm.t]
    third = max(1, len(during) // 3)
    middle = statistics.fmean(s.rss_mib for s in during[third : 2 * third] or during)
    last = statistics.fmean(s.rss_mib for s in during[-third:])
    growth = end_rss_mib - warm.rss_mib
    healthy_sent = sum(n for k, n in tally.sent.items() if k in ("get", "post", "slow", "stream"))
    wrong = sum(tally.wrong.values())
    return [
        SoakCheck(
            "memory growth",
            growth < max_growth,
            f"{warm.rss_mib:.1f} -> {end_rss_mib:.1f} MiB ({growth:+.1f}, limit {max_growth})",
        ),
        SoakCheck(
            "memory trend",
            last - middle < max_trend,
            f"mean middle third {middle:.1f}, last third {last:.1f} MiB "
            f"({last - middle:+.1f}, limit {max_trend})",
        ),
        SoakCheck(
            "fds",
            fds_back(end, baseline),
            f"{end.fds} ({end.sockets} sockets) after, {baseline.fds} ({baseline.sockets}) before",
        ),
        SoakCheck(
            "pools",
            end.in_use == 0 and end.waiting == 0 and end.in_flight == 0,
            f"in use {end.in_use:.0f}, waiting {end.waiting:.0f}, in flight {end.in_flight:.0f}",
        ),
        SoakCheck(
            "correctness",
            wrong == 0 and healthy_sent > 0,
            f"{wrong} wrong answers; {healthy_sent} requests to healthy upstreams"
            + (f"; {tally.wrong_examples}" if wrong else ""),
        ),
        SoakCheck("shutdown", exit_code == 0, f"exit code {exit_code} after SIGTERM"),
    ]


async def quiesce(
    relay: RelayUnderTest, client: httpx.AsyncClient, started: float, baseline: Sample
) -> Sample:
    """Wait (at most 30 s) for nothing in flight, no idle pooled connection, fds back."""
    deadline = time.monotonic() + 30
    while True:
        s = await sample(relay, client, started)
        settled = s.in_use == s.waiting == s.in_flight == s.idle == 0
        if (settled and fds_back(s, baseline)) or time.monotonic() > deadline:
            return s
        await asyncio.sleep(0.5)


@dataclass
class Options:
    duration: float
    rate: float
    concurrency: int
    workers: int
    interval: float
    warmup: float
    max_growth_mib: float
    max_trend_mib: float
    transport: str
    json: Path | None


async def soak(options: Options, tmp: Path) -> bool:
    servers = {
        name: await asyncio.start_server(serve(handler), LOOPBACK, 0, backlog=1024)
        for name, handler in (("healthy", healthy), ("slow", slow), ("faulty", faulty))
    }
    ports = {name: s.sockets[0].getsockname()[1] for name, s in servers.items()}
    ports["refused"] = free_port()
    try:
        with relay(ports, tmp, options.workers, options.transport) as (relay_, stop):
            async with httpx.AsyncClient(timeout=10, trust_env=False) as admin:
                return await run(options, relay_, stop, admin)
    finally:
        for server in servers.values():
            server.close()


async def run(
    options: Options,
    relay: RelayUnderTest,
    stop: Callable[[], int],
    admin: httpx.AsyncClient,
) -> bool:
    started = time.monotonic()
    await sample(relay, admin, started)  # so that the admin connection is in the baseline
    baseline = await sample(relay, admin, started)
    baseline.workers = options.workers
    print(f"relay pid {relay.process.pid}, {options.workers} worker(s); {environment()}")
    print(
        f"{options.duration:.0f} s at {options.rate:.0f} req/s, at most {options.concurrency} "
        f"in flight; sample every {options.interval:.0f} s; warm-up {options.warmup:.0f} s; "
        f"fds before traffic: {baseline.fds} ({baseline.sockets} sockets)"
    )
    tally = Tally()
    until = started + options.duration
    traffic = asyncio.create_task(drive(relay.url, options.rate, options.concurrency, until, tally))
    samples: list[Sample] = []
    warm: Sample | None = None
    while not traffic.done():
        await asyncio.wait({traffic}, timeout=options.interval)
        s = await sample(relay, admin, started)
        samples.append(s)
        print(show(s), flush=True)
        if warm is None and s.t >= options.warmup:
            warm = s
    traffic.result()
    last_loaded = samples[-1]
    end = await quiesce(relay, admin, started, baseline)
    print(f"after {end.t - last_loaded.t:.1f} s without traffic: {show(end)}")
    exit_code = await asyncio.to_thread(stop)
    checks = verdict(
        samples,
        warm or samples[0],
        end,
        # The end of the run: the last sample under load or the quiescent one, the higher.
        max(last_loaded.rss_mib, end.rss_mib),
        baseline,
        tally,
        exit_code,
        options.max_growth_mib,
        options.max_trend_mib,
    )
    report(options, samples, tally, checks)
    if options.json is not None:
        options.json.write_text(
            json.dumps(
                {
                    "options": {k: str(v) for k, v in asdict(options).items()},
                    "samples": [asdict(s) for s in samples],
                    "quiescent": asdict(end),
                    "sent": dict(tally.sent),
                    "statuses": dict(tally.statuses),
                    "checks": [asdict(c) for c in checks],
                    "ok": all(c.ok for c in checks),
                },
                indent=2,
            )
        )
    return all(c.ok for c in checks)


def report(options: Options, samples: list[Sample], tally: Tally, checks: list[SoakCheck]) -> None:
    step = max(1, len(samples) // 12)
    shown = samples[::step] if samples[-1] in samples[::step] else [*samples[::step], samples[-1]]
    print()
    print(
        markdown_table(
            ("t s", "RSS MiB", "fds", "in use", "idle", "waiting", "requests"),
            [
                (f"{s.t:.0f}", f"{s.rss_mib:.1f}", s.fds, f"{s.in_use:.0f}", f"{s.idle:.0f}",
                 f"{s.waiting:.0f}", s.requests)
                for s in shown
            ],
        )
    )  # fmt: skip
    print()
    print("sent by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(tally.sent.items())))
    print("client saw: " + ", ".join(f"{k} {n}" for k, n in sorted(tally.statuses.items())))
    print()
    print(markdown_table(("check", "result", "detail"), [
        (c.name, "ok" if c.ok else "FAILED", c.detail) for c in checks
    ]))  # fmt: skip
    print()
    print("verdict: " + ("FLAT" if all(c.ok for c in checks) else "NOT FLAT"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=180, help="seconds of traffic")
    parser.add_argument("--rate", type=float, default=150, help="requests started per second")
    parser.add_argument("--concurrency", type=int, default=32, help="most requests in flight")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--interval", type=float, help="seconds between samples")
    parser.add_argument("--warmup", type=float, help="seconds before the memory baseline")
    parser.add_argument("--max-growth-mib", type=float, default=16)
    parser.add_argument("--max-trend-mib", type=float, default=4)
    parser.add_argument("--transport", choices=("aiohttp", "httpcore"), default="aiohttp")
    parser.add_argument("--json", type=Path, help="write the samples and checks here")
    args = parser.parse_args()
    if not 1 <= args.duration <= 24 * 3600:
        parser.error("--duration must be between 1 s and 24 h")
    options = Options(
        duration=args.duration,
        rate=args.rate,
        concurrency=args.concurrency,
        workers=args.workers,
        # About 18 samples in a long run, at least one a second in a short one.
        interval=args.interval or max(1.0, min(10.0, args.duration / 18)),
        warmup=args.warmup if args.warmup is not None else min(30.0, args.duration / 5),
        max_growth_mib=args.max_growth_mib,
        max_trend_mib=args.max_trend_mib,
        transport=args.transport,
        json=args.json,
    )
    handle_signals()
    with tempfile.TemporaryDirectory(prefix="relay-soak-") as tmp:
        ok = asyncio.run(soak(options, Path(tmp)))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
