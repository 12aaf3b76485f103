"""Shared fixtures. The real servers themselves live in ``tests/harness.py``."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

TRANSPORTS = ["aiohttp", "httpcore"]


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest) -> str:
    """Run a test once per upstream transport."""
    return str(request.param)


@pytest.fixture
def no_error_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail the test if anything (proxy, uvicorn, asyncio, aiohttp) logged an error."""
    caplog.set_level(logging.WARNING)
    yield
    bad = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.ERROR
        or "never retrieved" in r.getMessage()
        or "Unclosed" in r.getMessage()
    ]
    assert not bad, "errors were logged:\n" + "\n".join(bad)
