"""Shared fixtures: real servers on ephemeral loopback ports (built by ``tests/support/``),
the transport parameter, the no-error-logs guard, and the ``live`` tier's guard."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest

from tests.support.logs import Records
from tests.support.relays import RunningRelay, StartRelay, one_upstream, run_relay
from tests.support.scripted import ScriptedUpstream
from tests.support.tiers import entering

TRANSPORTS = ["aiohttp", "httpcore"]


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    entering(item)  # before any fixture: a fixture may start what only live tests may


@pytest.hookimpl(trylast=True)
def pytest_runtest_teardown(item: pytest.Item) -> None:
    entering(None)


# What asyncio, aiohttp and the stdlib say about a leaked task, session or transport.
LEAK_MARKERS = ("never retrieved", "Unclosed", "unclosed", "was destroyed but it is pending")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Run a test once per upstream transport."""
    return str(request.param)


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    """A scripted HTTP/1.1 upstream (a real socket server); the test adds its handlers."""
    async with ScriptedUpstream({}).running() as running:
        yield running


@pytest.fixture
async def relay_to(transport: str) -> AsyncIterator[StartRelay]:
    """Start the proxy (real uvicorn servers) in front of one upstream named ``up``, with
    this test's transport: ``await relay_to(url, pool={...}, timeouts={...})``."""
    async with AsyncExitStack() as stack:

        async def start(url: str, **options: Any) -> RunningRelay:
            config = one_upstream(url, transport, **options)
            return await stack.enter_async_context(run_relay(config))

        yield start


def bad_records(records: list[logging.LogRecord]) -> list[str]:
    return [
        f"{r.name}: {r.getMessage()}"
        for r in records
        if r.levelno >= logging.ERROR or any(m in r.getMessage() for m in LEAK_MARKERS)
    ]


@pytest.fixture
def no_error_logs(
    caplog: pytest.LogCaptureFixture, recwarn: pytest.WarningsRecorder
) -> Iterator[None]:
    """Fail the test if anything (proxy, uvicorn.error, asyncio, aiohttp) logged an error or
    a leak warning at any point: setup, the test itself, or the servers' teardown."""
    caplog.set_level(logging.WARNING)
    yield
    gc.collect()  # surface "Unclosed ..." / "never retrieved" from objects dropped just now
    # caplog.records only holds the current phase (teardown): look at every phase.
    records = [
        *caplog.get_records("setup"),
        *caplog.get_records("call"),
        *caplog.records,
    ]
    bad = bad_records(records)
    bad += [
        f"warning {w.category.__name__}: {w.message}"
        for w in recwarn
        if issubclass(w.category, ResourceWarning | pytest.PytestUnraisableExceptionWarning)
        or any(m in str(w.message) for m in LEAK_MARKERS)
    ]
    assert not bad, "errors were logged:\n" + "\n".join(bad)


@pytest.fixture
def access(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Records:
    """The access records logged so far in the test, in order."""
    monkeypatch.setattr(logging.getLogger("relay.access"), "disabled", False)
    caplog.set_level(logging.INFO, logger="relay.access")
    return lambda: [r for r in caplog.records if r.name == "relay.access"]
