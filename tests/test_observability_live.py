"""Alerts and dashboards against the real thing: a real Prometheus, with the shipped rules,
scraping running proxies under traffic that includes faults.

The dashboard check runs once per entry of SETUPS: a way to start Relay (in-process, or as
a process with two workers, one of which is killed and respawned) and the traffic that gives
every panel data. Adding a setup is adding an entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml
from websockets.asyncio.client import connect as ws_connect

from tests.support.dashboards import DASHBOARDS, annotation_queries, load, panel_queries
from tests.support.http import http_client
from tests.support.net import closed_port, eventually
from tests.support.prometheus import Prometheus, prometheus
from tests.support.relays import (
    RelayProcess,
    RunningRelay,
    run_relay,
    spawn_relay,
    worker_processes,
)
from tests.support.rules import plain_groups
from tests.support.scripted import (
    ScriptedUpstream,
    delayed,
    endless_stream,
    hang,
    reset_mid_body,
    respond,
    stale_after_first,
)
from tests.support.wire import raw_request
from tests.support.ws_upstream import WsUpstream, ws_upstream

pytestmark = pytest.mark.live


def shipped_rules(tmp_path: Path) -> Path:
    """The plain rules file (every namespace: this Prometheus attaches none), with every
    ``for`` cut to zero.

    The expressions are the shipped ones; only the hold times (minutes in production) are
    removed so a test can watch the alerts reach ``firing``.
    """
    groups = plain_groups()
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["for"] = "0s"
    path = tmp_path / "relay-rules.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    return path


def faulty_upstream() -> ScriptedUpstream:
    """An upstream that answers, fails, stalls and resets."""
    return ScriptedUpstream(
        {
            "/ok": respond(200, b"ok"),
            "/missing": respond(404, b"no"),
            "/fail": respond(503, b"down"),
            "/slow": delayed(0.6, respond(200, b"slow")),
            "/hold": delayed(3.0, respond(200, b"held")),
            "/hang": hang,
            "/stream": endless_stream,
            "/reset": reset_mid_body,
            "/stale": stale_after_first(),
        }
    )


def faulty_config(upstream: ScriptedUpstream, ws: WsUpstream) -> dict[str, Any]:
    """Relay in front of ``upstream``, a two-connection pool, a port with nothing
    listening, and a WebSocket upstream under ``/ws``."""
    return {
        "log": {"access_log": False},
        "upstreams": {
            "api": {"url": upstream.url, "timeouts": {"read": 5}},
            "tight": {
                "url": upstream.url,
                "pool": {"max_connections": 2, "max_keepalive_connections": 2},
                "timeouts": {"pool": 0.3},
            },
            "dead": {"url": f"http://127.0.0.1:{closed_port()}"},
            # Many endpoints (one refusing), recycled connections: the endpoint panels.
            "pods": {
                "url": upstream.url,
                "endpoints": [upstream.url, f"http://127.0.0.1:{closed_port()}"],
                "pool": {"max_requests_per_connection": 2},
                "outlier": {"consecutive_failures": 1},
            },
            "ws": {"url": ws.url},
        },
        "routes": [
            {"prefix": "/tight", "upstream": "tight", "strip_prefix": True},
            {"prefix": "/dead", "upstream": "dead"},
            {"prefix": "/pods", "upstream": "pods", "strip_prefix": True},
            *({"prefix": path, "upstream": "api"} for path in upstream.handlers),
            {"prefix": "/ws", "upstream": "ws", "strip_prefix": True},
        ],
    }


@asynccontextmanager
async def faulty_relay() -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    """An in-process Relay in front of the faulty upstream."""
    upstream = faulty_upstream()
    async with (
        upstream.running(),
        ws_upstream() as ws,
        run_relay(faulty_config(upstream, ws)) as running,
    ):
        yield running, upstream


async def drive_faults(url: str, upstream: ScriptedUpstream, rounds: int) -> None:
    """One pass of everything the dashboards and alerts look at, ``rounds`` times, through
    the Relay at ``url``."""
    async with http_client(base_url=url, timeout=10) as client:
        for _ in range(rounds):
            await asyncio.gather(*(client.get("/ok") for _ in range(10)))
            await client.post("/ok", content=b"x" * 2048)
            await client.get("/missing")
            await client.get("/fail")
            await client.get("/slow")
            # Refused connections, enough of them for the connect-failure floor (0.1/s).
            await asyncio.gather(*(client.get("/dead/x") for _ in range(5)))
            # Many endpoints: one refuses (ejected, the request tried on the other), and
            # connections closed after two requests.
            for _ in range(4):
                await client.get("/pods/ok")
            await client.get("/nowhere")  # no route
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/reset")
            await raw_request(url, "/stream", read_bytes=3000)
            seen = len(upstream.seen)
            await raw_request(
                url, "/hang", hang_up_when=lambda seen=seen: len(upstream.seen) > seen
            )
            # Stale keep-alive: the second request on a connection is dropped and retried.
            async with http_client(base_url=url) as fresh:
                await fresh.get("/stale")
                await fresh.get("/stale")
            # Saturate the tight pool: two held, the rest wait and time out; enough of them
            # that the pool-timeout ratio passes its 1 request/s floor within a minute.
            await asyncio.gather(
                *(client.get("/tight/hold") for _ in range(2)),
                *(client.get("/tight/ok") for _ in range(20)),
                return_exceptions=True,
            )
            # One WebSocket session, a message each way.
            async with ws_connect(url.replace("http://", "ws://") + "/ws/echo") as ws:
                await ws.send("ping")
                await ws.recv()


@dataclass
class Target:
    """A running Relay as the dashboard check sees it."""

    admin: str  # host:port that Prometheus scrapes
    upstreams: str  # a value of $upstream covering its upstreams
    drive: Callable[[], Awaitable[None]]  # one round of traffic
    # After the traffic, before the panels are read (e.g. kill a worker and wait for the
    # restart to show); given the running Prometheus.
    settle: Callable[[Prometheus], Awaitable[None]] = field(default=lambda _: asyncio.sleep(0))


@asynccontextmanager
async def one_worker(tmp_path: Path) -> AsyncIterator[Target]:
    async with faulty_relay() as (relay, upstream):
        yield Target(
            admin=relay.admin_url.removeprefix("http://"),
            upstreams="api|tight|dead|pods|ws",
            drive=lambda: drive_faults(relay.url, upstream, rounds=1),
        )


async def kill_a_worker(relay: RelayProcess, prom: Prometheus) -> None:
    """SIGKILL one worker, then wait until Prometheus has seen it respawned and the process
    figures of both workers again."""
    victim = worker_processes(psutil.Process(relay.process.pid))[0]
    victim.kill()
    await asyncio.to_thread(prom.wait_for, 'relay_worker_restarts_total{job="relay"} == 1')
    both = 'count(process_start_time_seconds{job="relay", worker=~"0|1"}) == 2'
    await asyncio.to_thread(prom.wait_for, both)


@asynccontextmanager
async def two_workers(tmp_path: Path) -> AsyncIterator[Target]:
    """``python -m service`` with two workers (multiprocess metrics) in front of the faulty
    upstream; one worker is killed and respawned before the panels are read."""
    upstream = faulty_upstream()
    async with upstream.running(), ws_upstream() as ws:
        config = {
            **faulty_config(upstream, ws),
            "server": {"workers": 2, "grace_period_seconds": 2},
        }
        env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")}
        stack = contextlib.ExitStack()
        # Off the loop: the upstream the relay talks to runs on it.
        relay = await asyncio.to_thread(stack.enter_context, spawn_relay(config, tmp_path, env))
        try:
            yield Target(
                admin=relay.admin_url.removeprefix("http://"),
                upstreams="api|tight|dead|pods|ws",
                drive=lambda: drive_faults(relay.url, upstream, rounds=1),
                settle=lambda prom: kill_a_worker(relay, prom),
            )
        finally:
            await asyncio.to_thread(stack.close)


# name -> how to start it (given a temp dir).
SETUPS: dict[str, Callable[[Path], AbstractAsyncContextManager[Target]]] = {
    "one worker": one_worker,
    "two workers": two_workers,
}


@contextlib.contextmanager
def scraping(admin: str, rules: Path) -> Iterator[Prometheus]:
    with prometheus(
        [admin],
        rule_files=[rules],
        extra_args=["--enable-feature=exemplar-storage", "--rules.alert.resend-delay=1s"],
    ) as prom:
        yield prom


async def firing(prom: Prometheus) -> dict[str, list[dict[str, Any]]]:
    data = await asyncio.to_thread(prom.api, "/api/v1/alerts")
    out: dict[str, list[dict[str, Any]]] = {}
    for alert in data["alerts"]:
        if alert["state"] == "firing":
            out.setdefault(alert["labels"]["alertname"], []).append(alert)
    return out


async def test_alerts_fire_against_a_real_prometheus(tmp_path: Path) -> None:
    async with faulty_relay() as (relay, upstream):
        with scraping(relay.admin_url.removeprefix("http://"), shipped_rules(tmp_path)) as prom:
            await asyncio.to_thread(prom.wait_for, 'up{job="relay"} == 1')
            wanted = {
                "RelayPoolSaturated",
                "RelayClientDisconnectSpike",
                "RelayUpstreamResetSpike",
                "RelayPoolTimeouts",
                "RelayUpstreamConnectFailures",
            }
            alerts: dict[str, list[dict[str, Any]]] = {}
            deadline = asyncio.get_running_loop().time() + 90
            async with http_client(timeout=10) as holder:
                while not wanted <= set(alerts):
                    missing = sorted(wanted - set(alerts))
                    assert asyncio.get_running_loop().time() < deadline, missing
                    # Keep the tight pool full across scrapes while the faults run.
                    hold = asyncio.gather(
                        *(holder.get(f"{relay.url}/tight/hold") for _ in range(2)),
                        return_exceptions=True,
                    )
                    await drive_faults(relay.url, upstream, rounds=1)
                    await hold
                    alerts = await firing(prom)
            saturated = alerts["RelayPoolSaturated"][0]
            assert saturated["labels"]["upstream"] == "tight"
            assert saturated["labels"]["severity"] == "warning"
            assert saturated["annotations"]["runbook_url"].endswith("#relaypoolsaturated")
            for name in ("RelayClientDisconnectSpike", "RelayUpstreamResetSpike"):
                assert {a["labels"]["upstream"] for a in alerts[name]} == {"api"}, name
            assert {a["labels"]["upstream"] for a in alerts["RelayUpstreamConnectFailures"]} == {
                "dead"
            }
            assert {a["labels"]["owner"] for a in alerts["RelayUpstreamResetSpike"]} == {"upstream"}
            # Relay is up: what pages when it is not stays quiet.
            assert not {"RelayDown", "RelayAbsent", "RelayTargetDown"} & set(alerts)
            await eventually(lambda: relay.relay.upstreams()["tight"].snapshot().in_use == 0, 10)


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"(?<![:\w])((?:relay|process)_[a-z_]+)\b(?!:)", expr))


@pytest.mark.parametrize("setup", SETUPS)
async def test_every_dashboard_query_returns_data(setup: str, tmp_path: Path) -> None:
    """Every panel and annotation of every dashboard, with the variables set as Grafana sets
    them for a Relay outside Kubernetes (no cluster or namespace label: empty values), gets
    data from a real Prometheus.
    """
    async with SETUPS[setup](tmp_path) as target:
        with scraping(target.admin, shipped_rules(tmp_path)) as prom:
            await asyncio.to_thread(prom.wait_for, 'up{job="relay"} == 1')
            await target.drive()
            await target.settle(prom)
            values = {
                "cluster": "",
                "namespace": "",
                "job": "relay",
                "instance": target.admin,
                "upstream": target.upstreams,
            }
            queries = [
                (f"{path.stem} / {title}", expr)
                for path in DASHBOARDS
                for title, expr in [
                    *panel_queries(load(path), values),
                    *annotation_queries(load(path), values),
                ]
            ]
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                empty = [
                    (where, expr)
                    for where, expr in queries
                    if not await asyncio.to_thread(prom.query, expr)
                ]
                if not empty or asyncio.get_running_loop().time() > deadline:
                    break
                await target.drive()  # rates and recorded ratios need a few more scrapes
            assert not empty, "queries without data:\n" + "\n".join(f"{w}: {e}" for w, e in empty)
