"""Stop signals: one Ctrl-C or one SIGTERM is one graceful drain, however it is delivered;
a second, deliberate one cuts the drain short; a cut request says so.

The relay runs as ``python -m service`` in a process group of its own, as a shell starts
it, in front of an upstream that holds every request: a signal to the group is what a
terminal's Ctrl-C does (and systemd's default ``KillMode=control-group``), a signal to the
supervisor alone is what Kubernetes does.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.http import http_client
from tests.support.net import eventually
from tests.support.relays import RelayProcess, one_upstream, run_relay, spawn_relay
from tests.support.scripted import ScriptedUpstream, delayed, endless_stream, hang, respond

IN_FLIGHT = 8
BODY = b"slow but complete"
HOLD_SECONDS = 2.0  # how long the upstream holds each request: longer than the signal's path


def config(workers: int, **server: Any) -> dict[str, Any]:
    return {
        "server": {"workers": workers, "drain_delay_seconds": 0.2, **server},
        "log": {"access_log": True},
    }


def env_for(workers: int, tmp_path: Path) -> dict[str, str] | None:
    # One multiprocess metrics directory per test: the supervisor empties it at start.
    return {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prom")} if workers > 1 else None


def deliver(relay: RelayProcess, how: str) -> None:
    """``group``: SIGINT to the whole process group (a terminal's Ctrl-C);
    ``supervisor``: SIGTERM to the main process alone (Kubernetes, ``kill PID``);
    ``group-term``: SIGTERM to the whole group (systemd's default KillMode)."""
    if how == "group":
        os.killpg(relay.process.pid, signal.SIGINT)
    elif how == "group-term":
        os.killpg(relay.process.pid, signal.SIGTERM)
    else:
        relay.process.send_signal(signal.SIGTERM)


async def wait_lines(relay: RelayProcess, prefix: str, count: int, within: float = 30) -> None:
    await eventually(lambda: len(relay.messages(prefix)) >= count, within)


async def exit_code(relay: RelayProcess, within: float) -> int:
    deadline = time.monotonic() + within
    while relay.process.poll() is None:
        assert time.monotonic() < deadline, "relay did not exit in time"
        await asyncio.sleep(0.05)
    return relay.process.returncode


def problems(relay: RelayProcess) -> list[str]:
    """Lines that must never appear: errors, tracebacks, the force-exit of old."""
    text = relay.log()
    bad = [line for line in relay.lines() if line["level"] in ("ERROR", "CRITICAL")]
    return [str(line) for line in bad] + (["Traceback"] if "Traceback" in text else [])


async def send_all(url: str, count: int) -> list[asyncio.Task[httpx.Response]]:
    client = http_client(timeout=60)

    async def one(index: int) -> httpx.Response:
        return await client.get(f"{url}/slow/{index}")

    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    # Closed once every request has its answer.
    asyncio.get_running_loop().create_task(_close_after(client, tasks))
    return tasks


async def _close_after(client: httpx.AsyncClient, tasks: list[asyncio.Task[Any]]) -> None:
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.aclose()


@pytest.mark.live
@pytest.mark.parametrize(
    ("workers", "how"),
    [(2, "group"), (2, "supervisor"), (2, "group-term"), (1, "group"), (1, "supervisor")],
)
async def test_one_signal_is_one_graceful_drain(tmp_path: Path, workers: int, how: str) -> None:
    async with ScriptedUpstream({}).running() as upstream:
        upstream.handlers.update(
            {f"/slow/{i}": delayed(HOLD_SECONDS, respond(200, BODY)) for i in range(IN_FLIGHT)}
        )
        settings = {**config(workers, grace_period_seconds=30), **one_upstream(upstream.url)}
        with spawn_relay(settings, tmp_path, env_for(workers, tmp_path), new_session=True) as relay:
            await wait_lines(relay, "ready: ", workers)
            tasks = await send_all(relay.url, IN_FLIGHT)
            await eventually(lambda: len(upstream.seen) == IN_FLIGHT, 20)
            deliver(relay, how)
            responses = await asyncio.gather(*tasks)
            assert [r.status_code for r in responses] == [200] * IN_FLIGHT
            assert all(r.content == BODY for r in responses)
            assert await exit_code(relay, 30) == 0
    assert problems(relay) == []
    # One drain per process: each worker drained once and no drain was cut short.
    assert len(relay.messages("proxy listener closed")) == workers
    assert relay.messages("second signal") == []
    access = [line for line in relay.lines() if line["logger"] == "relay.access"]
    assert [(line["status"], line["outcome"]) for line in access] == [(200, "ok")] * IN_FLIGHT


@pytest.mark.live
@pytest.mark.parametrize(
    ("workers", "how"), [(2, "group"), (2, "supervisor"), (1, "group"), (1, "supervisor")]
)
async def test_a_second_signal_cuts_the_drain_short(tmp_path: Path, workers: int, how: str) -> None:
    async with ScriptedUpstream({}).running() as upstream:
        upstream.handlers.update({f"/slow/{i}": hang for i in range(IN_FLIGHT)})
        # A grace period far longer than the test may take: only the cut can end it.
        settings = {**config(workers, grace_period_seconds=120), **one_upstream(upstream.url)}
        with spawn_relay(settings, tmp_path, env_for(workers, tmp_path), new_session=True) as relay:
            await wait_lines(relay, "ready: ", workers)
            tasks = await send_all(relay.url, IN_FLIGHT)
            await eventually(lambda: len(upstream.seen) == IN_FLIGHT, 20)
            deliver(relay, how)
            await wait_lines(relay, "proxy listener closed", workers)
            signalled = time.monotonic()
            deliver(relay, how)
            responses = await asyncio.gather(*tasks)
            assert await exit_code(relay, 60) == 0
            assert time.monotonic() - signalled < 60
    assert problems(relay) == []
    for response in responses:
        assert response.status_code == 503
        assert (
            response.headers["proxy-status"] == 'relay; error=proxy_internal_error; next-hop="up"'
        )
    # One line for the second signal: the supervisor's, or the single process's.
    cut_lines = [line for line in relay.lines() if line["message"].startswith("second signal")]
    assert len(cut_lines) == 1
    assert cut_lines[0]["level"] == "WARNING"
    access = [line for line in relay.lines() if line["logger"] == "relay.access"]
    assert [(line["status"], line["outcome"]) for line in access] == [(503, "shutdown")] * IN_FLIGHT


# -- in-process: what a cut request leaves in metrics and logs ------------------------------


async def test_cut_requests_are_answered_and_counted_as_such(
    upstream: ScriptedUpstream, no_error_logs: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="relay.access")
    upstream.handlers["/hang"] = hang
    upstream.handlers["/stream"] = endless_stream
    config = {**one_upstream(upstream.url), "server": {"grace_period_seconds": 60}}
    async with (
        run_relay(config) as running,
        http_client(base_url=running.url, timeout=30) as client,
    ):
        waiting = [asyncio.create_task(client.get("/hang")) for _ in range(3)]
        chunks: list[bytes] = []

        async def stream() -> None:
            async with client.stream("GET", "/stream") as response:
                assert response.status_code == 200
                async for chunk in response.aiter_raw():
                    chunks.append(chunk)

        streaming = asyncio.create_task(stream())
        await eventually(lambda: len(upstream.seen) == 4 and bool(chunks))
        running.service.request_shutdown("SIGTERM")
        running.service.request_shutdown("SIGTERM")
        answers = await asyncio.gather(*waiting)
        with pytest.raises(httpx.HTTPError):
            await streaming  # cut mid-body: never presented as complete
    assert [a.status_code for a in answers] == [503] * 3
    registry = running.relay.metrics.registry
    labels = {"upstream": "up", "route": "up", "method": "GET"}
    assert registry.get_sample_value("relay_requests_total", {**labels, "code": "503"}) == 3
    assert registry.get_sample_value("relay_requests_total", {**labels, "code": "200"}) == 1
    errors = {"upstream": "up", "reason": "shutdown"}
    assert registry.get_sample_value("relay_upstream_errors_total", errors) == 4
    outcomes = sorted(
        (r.__dict__["status"], r.__dict__["outcome"])
        for r in caplog.records
        if r.name == "relay.access"
    )
    assert outcomes == [(200, "shutdown")] + [(503, "shutdown")] * 3
