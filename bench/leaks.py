"""Leak safety of the pool under cancellation, per transport, in one run (encode/httpcore#1093).

An upstream (bench/upstream.py, its own process) answers ``/slow`` after 200 ms and
``/fast`` at once. Every client under test has a pool of 4 connections (pool timeout 2 s).
Two phases, one after the other on the same client:

  storm  200 requests to /slow at once, each given up after 50 ms: at most 4 get a
         connection, the others are cancelled while they wait for a pool slot.
  churn  5 s of 20 concurrent loops sending /fast, each request given up after a random
         time between 0 and twice the client's own median latency (measured for 1 s just
         before, at the same concurrency), so cancellations land at every stage: waiting
         for a slot, connecting, sending, reading, closing. #1093 is reported in this shape.

After each phase the client is left alone for 2 s, then checked: the pool snapshot
(nothing in use, nobody waiting, no connection held by the transport's own pool), and 4
concurrent fresh requests to /slow, which a healthy pool serves in about one upstream
delay; with a leaked slot they wait out the pool timeout instead (503 from Relay,
``PoolTimeout`` in process). Any of those is reported as LEAKED. "upstream max in flight"
is the upstream's own count: a request whose connection was just dropped still counts until
its delay ends, so it can exceed the pool size by the requests just abandoned.

Clients:
  via Relay   Relay as its own process (1 worker) per transport. The clients hang up (TCP
              close), which cancels the proxy's handler; "in use" and "waiting" are the
              gate's figures from the admin /metrics endpoint.
  in-process  Relay's ``Upstream`` (gate + transport, as the proxy uses it) per transport,
              and a bare ``httpx.AsyncClient`` (its default httpcore pool with the same
              limits, no gate). The request task itself is cancelled (``asyncio.wait_for``);
              "transport busy" counts the connections the transport's own pool holds.

    python bench/leaks.py [--churn 5] [--settle 2] [--only via,inproc] [--loops uvloop,asyncio]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import httpx
from common import (
    BENCH,
    LOOPBACK,
    TRANSPORTS,
    ServedRelay,
    environment,
    free_port,
    handle_signals,
    markdown_table,
    process,
    relay,
    wait_ready,
)
from stock_httpx_aiohttp import swap_to_stock

from service.config_upstreams import UpstreamConfig
from service.upstreams.gated import NullPoolObserver
from service.upstreams.pools import Upstream


@dataclass
class LeakRun:
    delay: float
    limit: int
    clients: int
    give_up: float
    churn: float
    calibrate: float
    churn_loops: int
    settle: float
    pool_timeout: float


@dataclass
class PhaseResult:
    """What one phase did and the state it left behind."""

    client: str
    phase: str
    sent: int = 0
    gave_up: int = 0
    give_up_max: float = 0.0
    upstream_max_in_flight: int = 0
    in_use: int | str = "-"
    waiting: int | str = "-"
    transport_busy: int | str = "-"
    fresh_ok: int = 0
    fresh_seconds: float = 0.0
    fresh_error: str = ""
    notes: list[str] = field(default_factory=list)

    def leaked(self, settings: LeakRun) -> bool:
        numbers = [
            v for v in (self.in_use, self.waiting, self.transport_busy) if isinstance(v, int)
        ]
        return (
            any(numbers)
            or self.fresh_ok < settings.limit
            or self.fresh_seconds > settings.pool_timeout
        )


# -- the upstream --------------------------------------------------------------------------


@contextmanager
def slow_upstream(delay: float) -> Iterator[str]:
    port = free_port()
    args = [sys.executable, str(BENCH / "upstream.py"), "--port", str(port), "--delay", str(delay)]
    with process(args) as proc:
        wait_ready(f"http://{LOOPBACK}:{port}/stats", proc)
        yield f"http://{LOOPBACK}:{port}"


async def upstream_stats(base: str, reset: bool = False) -> dict[str, int]:
    async with httpx.AsyncClient(trust_env=False) as client:
        response = await client.get(f"{base}/stats{'?reset' if reset else ''}", timeout=5)
        stats: dict[str, int] = response.json()
        return stats


# -- load shapes, for any "send one request, give up after t" callable ---------------------

Send = Callable[[str, float], Awaitable[bool]]  # (path, give up after) -> answered in time


async def storm(send: Send, s: LeakRun) -> tuple[int, int, float]:
    answered = await asyncio.gather(*(send("/slow", s.give_up) for _ in range(s.clients)))
    return s.clients, answered.count(False), s.give_up


async def churn(send: Send, s: LeakRun) -> tuple[int, int, float]:
    """``churn_loops`` loops for ``churn`` seconds, each request given up after a random
    0 to 2x the client's own median latency (measured first, at the same concurrency), so
    cancellations land at every stage of an exchange whatever the client's speed."""
    latencies: list[float] = []
    end = time.monotonic() + s.calibrate

    async def timed() -> None:
        while time.monotonic() < end:
            started = time.monotonic()
            if await send("/fast", 10.0):
                latencies.append(time.monotonic() - started)

    await asyncio.gather(*(timed() for _ in range(s.churn_loops)))
    give_up = 2 * statistics.median(latencies) if latencies else s.give_up
    sent = gave_up = 0
    end = time.monotonic() + s.churn
    rng = random.Random(1093)

    async def loop() -> None:
        nonlocal sent, gave_up
        while time.monotonic() < end:
            sent += 1
            if not await send("/fast", rng.uniform(0, give_up)):
                gave_up += 1

    await asyncio.gather(*(loop() for _ in range(s.churn_loops)))
    return sent, gave_up, give_up


async def fresh(get: Callable[[], Awaitable[int]], check: PhaseResult, s: LeakRun) -> None:
    """``limit`` concurrent requests to /slow; a healthy pool answers in about one delay."""
    started = time.monotonic()
    results = await asyncio.gather(*(get() for _ in range(s.limit)), return_exceptions=True)
    check.fresh_seconds = time.monotonic() - started
    check.fresh_ok = sum(1 for r in results if r == 200)
    errors = sorted(
        {type(r).__name__ if isinstance(r, BaseException) else str(r) for r in results if r != 200}
    )
    check.fresh_error = ", ".join(errors)


# -- via Relay (its own process) -----------------------------------------------------------


async def raw_get(port: int, path: str, give_up: float) -> int | None:
    """One request on its own connection; on giving up the connection is closed."""

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nhost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            return int(head.split(b" ", 2)[1])
        finally:
            writer.close()

    try:
        return await asyncio.wait_for(exchange(), give_up)
    except (TimeoutError, OSError, asyncio.IncompleteReadError):
        return None


def relay_snapshot(proc: ServedRelay, check: PhaseResult) -> None:
    metrics = proc.metrics()
    check.in_use = int(metrics.sum("relay_pool_connections", upstream="up", state="in_use"))
    check.waiting = int(metrics.sum("relay_pool_waiting_requests", upstream="up"))
    in_flight = int(metrics.sum("relay_requests_in_flight", upstream="up"))
    if in_flight:
        check.notes.append(f"{in_flight} requests still in flight")


async def via_relay(transport: str, upstream: str, s: LeakRun) -> list[PhaseResult]:
    checks = []
    with relay(upstream, transport, max_connections=s.limit, pool_timeout=s.pool_timeout) as proc:

        async def send(path: str, give_up: float) -> bool:
            return await raw_get(proc.port, path, give_up) == 200

        async def get() -> int:
            status = await raw_get(proc.port, "/slow", s.pool_timeout + s.delay + 2)
            return -1 if status is None else status

        await fresh(get, PhaseResult("warm-up", "-"), s)  # connections exist before the storm
        for phase, shape in (("storm", storm), ("churn", churn)):
            check = PhaseResult(f"via Relay, {transport}", phase)
            await upstream_stats(upstream, reset=True)
            check.sent, check.gave_up, check.give_up_max = await shape(send, s)
            check.upstream_max_in_flight = (await upstream_stats(upstream))["max_in_flight"]
            await asyncio.sleep(s.settle)
            relay_snapshot(proc, check)
            await fresh(get, check, s)
            checks.append(check)
    return checks


# -- in process ----------------------------------------------------------------------------


def httpcore_notes(pool: Any, check: PhaseResult) -> None:
    """What an httpcore pool holds that is not idle, by connection state."""
    states: dict[str, int] = {}
    for connection in pool.connections:
        if not connection.is_idle():
            info = repr(connection)
            state = next((w for w in ("CONNECTING", "NEW", "ACTIVE", "CLOSED") if w in info), "?")
            states[state] = states.get(state, 0) + 1
    if states:
        held = ", ".join(f"{n} {state}" for state, n in sorted(states.items()))
        check.notes.append(f"httpcore pool holds {held}; {len(pool._requests)} requests registered")


def transport_busy(inner: object) -> int:
    """Connections the transport's own pool holds that are not idle (in use or orphaned)."""
    if isinstance(inner, httpx.AsyncHTTPTransport):
        return sum(1 for c in inner._pool.connections if not c.is_idle())
    session = getattr(inner, "_session", None) or getattr(inner, "client", None)
    if isinstance(session, aiohttp.ClientSession) and session.connector is not None:
        return len(getattr(session.connector, "_acquired", ()))
    return 0


async def in_process(
    name: str,
    client: httpx.AsyncClient,
    snapshot: Callable[[PhaseResult], None],
    base: str,
    s: LeakRun,
) -> list[PhaseResult]:
    async def send(path: str, give_up: float) -> bool:
        try:
            response = await asyncio.wait_for(client.get(base + path), give_up)
        except (TimeoutError, httpx.HTTPError):
            return False
        return response.status_code == 200

    async def get() -> int:
        response = await client.get(base + "/slow")
        return response.status_code

    checks = []
    await fresh(get, PhaseResult("warm-up", "-"), s)
    for phase, shape in (("storm", storm), ("churn", churn)):
        check = PhaseResult(name, phase)
        await upstream_stats(base, reset=True)
        check.sent, check.gave_up, check.give_up_max = await shape(send, s)
        check.upstream_max_in_flight = (await upstream_stats(base))["max_in_flight"]
        await asyncio.sleep(s.settle)
        snapshot(check)
        await fresh(get, check, s)
        checks.append(check)
    return checks


async def relay_upstream_in_process(
    transport: str, base: str, s: LeakRun, loop: str
) -> list[PhaseResult]:
    config = UpstreamConfig.model_validate(
        {
            "url": base,
            "transport": "aiohttp" if transport == "stock" else transport,
            "pool": {"max_connections": s.limit, "max_keepalive_connections": s.limit},
            "timeouts": {"pool": s.pool_timeout},
        }
    )
    upstream = Upstream("up", config, NullPoolObserver())
    async with upstream.client as client:
        if transport == "stock":
            await swap_to_stock(upstream)

        def snapshot(check: PhaseResult) -> None:
            snap = upstream.snapshot()
            check.in_use, check.waiting = snap.in_use, snap.waiting
            inner = upstream.transport.inner
            check.transport_busy = transport_busy(inner)
            if isinstance(inner, httpx.AsyncHTTPTransport):
                httpcore_notes(inner._pool, check)

        name = f"in-process ({loop}), Relay gate, {transport}"
        return await in_process(name, client, snapshot, base, s)


async def bare_httpx(base: str, s: LeakRun, loop: str) -> list[PhaseResult]:
    limits = httpx.Limits(max_connections=s.limit, max_keepalive_connections=s.limit)
    timeout = httpx.Timeout(5.0, pool=s.pool_timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        transport = client._transport
        assert isinstance(transport, httpx.AsyncHTTPTransport)
        pool = transport._pool

        def snapshot(check: PhaseResult) -> None:
            busy = [c for c in pool.connections if not c.is_idle()]
            check.in_use = len(busy)
            check.waiting = sum(1 for r in pool._requests if r.is_queued())
            check.transport_busy = len(busy)
            httpcore_notes(pool, check)

        name = f"in-process ({loop}), bare httpx.AsyncClient (httpcore pool, no gate)"
        return await in_process(name, client, snapshot, base, s)


# -- main ----------------------------------------------------------------------------------


def report(checks: list[PhaseResult], s: LeakRun) -> str:
    header = [
        "client", "phase", "gave up / sent (give-up time)", "upstream max in flight", "in use",
        "waiting", "transport busy", f"{s.limit} fresh /slow", "verdict",
    ]  # fmt: skip
    rows: list[list[Any]] = []
    for c in checks:
        fresh_text = f"{c.fresh_ok}/{s.limit} ok in {c.fresh_seconds:.2f}s"
        if c.fresh_error:
            fresh_text += f" ({c.fresh_error})"
        verdict = "LEAKED" if c.leaked(s) else "ok"
        if c.notes:
            verdict += " (" + "; ".join(c.notes) + ")"
        rows.append(
            [
                c.client,
                c.phase,
                f"{c.gave_up}/{c.sent} (0-{c.give_up_max * 1000:.0f} ms)"
                if c.phase == "churn"
                else f"{c.gave_up}/{c.sent} ({c.give_up_max * 1000:.0f} ms)",
                c.upstream_max_in_flight,
                c.in_use,
                c.waiting,
                c.transport_busy,
                fresh_text,
                verdict,
            ]
        )
    return markdown_table(header, rows)


async def run(s: LeakRun, via: bool, inproc: bool, loop: str) -> list[PhaseResult]:
    checks: list[PhaseResult] = []
    with slow_upstream(s.delay) as base:
        if via:
            for transport in TRANSPORTS:
                checks += await via_relay(transport, base, s)
                print(f"  via Relay, {transport}: done", flush=True)
        if inproc:
            for transport in TRANSPORTS:
                checks += await relay_upstream_in_process(transport, base, s, loop)
                print(f"  in-process ({loop}), Relay gate, {transport}: done", flush=True)
            checks += await bare_httpx(base, s, loop)
            print(f"  in-process ({loop}), bare httpx: done", flush=True)
    return checks


def run_on(loop: str, s: LeakRun, via: bool, inproc: bool) -> list[PhaseResult]:
    if loop == "uvloop":
        import uvloop

        return uvloop.run(run(s, via, inproc, loop))
    return asyncio.run(run(s, via, inproc, loop))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--delay", type=float, default=0.2, help="upstream delay of /slow")
    parser.add_argument("--limit", type=int, default=4, help="pool max_connections")
    parser.add_argument("--clients", type=int, default=200, help="storm size")
    parser.add_argument("--give-up", type=float, default=0.05, help="storm client timeout")
    parser.add_argument("--churn", type=float, default=5.0, help="churn phase seconds")
    parser.add_argument("--churn-loops", type=int, default=20)
    parser.add_argument(
        "--calibrate", type=float, default=1.0, help="seconds measuring latency before churn"
    )
    parser.add_argument("--settle", type=float, default=2.0, help="pause before checking")
    parser.add_argument("--pool-timeout", type=float, default=2.0)
    parser.add_argument("--only", default="via,inproc", help="via, inproc or both")
    parser.add_argument(
        "--loops",
        default="uvloop,asyncio",
        help="event loops for the in-process rows (Relay runs uvloop; #1093 was reported on"
        " asyncio); the bench client of the via-Relay rows runs on the first",
    )
    args = parser.parse_args()
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    if not loops or not set(loops) <= {"uvloop", "asyncio"}:
        parser.error("--loops: a comma-separated list of uvloop, asyncio")
    s = LeakRun(
        delay=args.delay, limit=args.limit, clients=args.clients, give_up=args.give_up,
        churn=args.churn, churn_loops=args.churn_loops, calibrate=args.calibrate,
        settle=args.settle, pool_timeout=args.pool_timeout,
    )  # fmt: skip
    handle_signals()
    print(environment())
    print(
        f"pool of {s.limit}, pool timeout {s.pool_timeout:g}s, /slow delay {s.delay * 1000:.0f} ms;"
        f" storm: {s.clients} clients giving up after {s.give_up * 1000:.0f} ms;"
        f" churn: {s.churn:g}s of {s.churn_loops} loops giving up after a random 0 to 2x"
        f" median latency; checks {s.settle:g}s after each phase;"
        f" in-process event loops: {args.loops}\n",
        flush=True,
    )
    checks: list[PhaseResult] = []
    for index, loop in enumerate(loops):
        checks += run_on(
            loop, s, via="via" in args.only and index == 0, inproc="inproc" in args.only
        )
    print()
    print(report(checks, s))
    leaked = [c.client for c in checks if c.leaked(s)]
    print("\nleaked: " + (", ".join(dict.fromkeys(leaked)) if leaked else "none"))


if __name__ == "__main__":
    main()
