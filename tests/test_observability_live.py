"""Alerts and dashboards against the real thing: a real Prometheus, with the shipped rules,
scraping a running proxy under traffic that includes faults."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.alert_rules import plain_groups
from tests.dashboard_queries import DASHBOARDS, load, panel_queries
from tests.harness import (
    RunningRelay,
    ScriptedUpstream,
    closed_port,
    delayed,
    endless_stream,
    eventually,
    hang,
    raw_request,
    reset_mid_body,
    respond,
    run_relay,
    stale_after_first,
)
from tests.prometheus_server import Prometheus, prometheus


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


@pytest.fixture
async def relay_under_test() -> AsyncIterator[tuple[RunningRelay, ScriptedUpstream]]:
    upstream = ScriptedUpstream(
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
    async with upstream.running():
        config: dict[str, Any] = {
            "log": {"access_log": False},
            "upstreams": {
                "api": {"url": upstream.url, "timeouts": {"read": 5}},
                "tight": {
                    "url": upstream.url,
                    "pool": {"max_connections": 2, "max_keepalive_connections": 2},
                    "timeouts": {"pool": 0.3},
                },
                "dead": {"url": f"http://127.0.0.1:{closed_port()}"},
            },
            "routes": [
                {"prefix": "/tight", "upstream": "tight", "strip_prefix": True},
                {"prefix": "/dead", "upstream": "dead"},
                *({"prefix": path, "upstream": "api"} for path in upstream.handlers),
            ],
        }
        async with run_relay(config) as running:
            yield running, upstream


async def drive_faults(relay: RunningRelay, upstream: ScriptedUpstream, rounds: int) -> None:
    """One pass of everything the dashboards and alerts look at, ``rounds`` times."""
    async with httpx.AsyncClient(base_url=relay.url, timeout=10) as client:
        for _ in range(rounds):
            await asyncio.gather(*(client.get("/ok") for _ in range(10)))
            await client.post("/ok", content=b"x" * 2048)
            await client.get("/missing")
            await client.get("/fail")
            await client.get("/slow")
            await client.get("/dead/x")
            await client.get("/nowhere")  # no route
            with contextlib.suppress(httpx.HTTPError):
                await client.get("/reset")
            await raw_request(relay.url, "/stream", read_bytes=3000)
            seen = len(upstream.seen)
            await raw_request(
                relay.url, "/hang", hang_up_when=lambda seen=seen: len(upstream.seen) > seen
            )
            # Stale keep-alive: the second request on a connection is dropped and retried.
            async with httpx.AsyncClient(base_url=relay.url) as fresh:
                await fresh.get("/stale")
                await fresh.get("/stale")
            # Saturate the tight pool: two held, the rest wait and time out; enough of them
            # that the pool-timeout ratio passes its 1 request/s floor within a minute.
            await asyncio.gather(
                *(client.get("/tight/hold") for _ in range(2)),
                *(client.get("/tight/ok") for _ in range(20)),
                return_exceptions=True,
            )


@contextlib.contextmanager
def scraping(relay: RunningRelay, rules: Path) -> Iterator[Prometheus]:
    admin = relay.admin_url.removeprefix("http://")
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


async def test_alerts_fire_and_every_dashboard_query_returns_data(
    relay_under_test: tuple[RunningRelay, ScriptedUpstream], tmp_path: Path
) -> None:
    relay, upstream = relay_under_test
    with scraping(relay, shipped_rules(tmp_path)) as prom:
        await asyncio.to_thread(prom.wait_for, 'up{job="relay"} == 1')
        wanted = {
            "RelayPoolSaturated",
            "RelayClientDisconnectSpike",
            "RelayUpstreamResetSpike",
            "RelayPoolTimeouts",
        }
        alerts: dict[str, list[dict[str, Any]]] = {}
        deadline = asyncio.get_running_loop().time() + 90
        async with httpx.AsyncClient(timeout=10) as holder:
            while not wanted <= set(alerts):
                assert asyncio.get_running_loop().time() < deadline, sorted(alerts)
                # Keep the tight pool full across scrapes while the faults run.
                hold = asyncio.gather(
                    *(holder.get(f"{relay.url}/tight/hold") for _ in range(2)),
                    return_exceptions=True,
                )
                await drive_faults(relay, upstream, rounds=1)
                await hold
                alerts = await firing(prom)
        saturated = alerts["RelayPoolSaturated"][0]
        assert saturated["labels"]["upstream"] == "tight"
        assert saturated["labels"]["severity"] == "warning"
        assert saturated["annotations"]["runbook_url"].endswith("#relaypoolsaturated")
        assert {a["labels"]["upstream"] for a in alerts["RelayClientDisconnectSpike"]} == {"api"}
        assert {a["labels"]["upstream"] for a in alerts["RelayUpstreamResetSpike"]} == {"api"}
        # Nothing pages for an upstream that was never called.
        assert not any(a["labels"].get("upstream") == "unused" for v in alerts.values() for a in v)
        await eventually(lambda: relay.relay.upstreams()["tight"].snapshot().in_use == 0, 10)

        # Every panel of every dashboard, variables set as a user would pick them.
        values = {
            "job": "relay",
            "namespace": ".*",
            "instance": relay.admin_url[7:],
            "upstream": "api|tight|dead",
        }
        empty = []
        for path in DASHBOARDS:
            for title, expr in panel_queries(load(path), values):
                result = await asyncio.to_thread(prom.query, expr)
                if not result:
                    empty.append(f"{path.stem} / {title}: {expr}")
        assert not empty, "panels without data:\n" + "\n".join(empty)
