"""``server.app_hook``s that make every worker misbehave on cue (tests/test_workers.py): one
that crashes at start, one that holds the start back so that a worker stays "starting" (its
admin listener answering, its proxy listener not yet) for a while."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

START_DELAY_SECONDS = 2.0


def crash(app: FastAPI) -> None:
    raise RuntimeError("this worker cannot start")


def slow_start(app: FastAPI) -> None:
    opens = app.router.lifespan_context

    @asynccontextmanager
    async def later(application: Any) -> AsyncIterator[Any]:
        await asyncio.sleep(START_DELAY_SECONDS)
        async with opens(application) as state:
            yield state

    app.router.lifespan_context = later
