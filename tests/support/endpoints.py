"""Upstreams that are many endpoints: scripted servers on several loopback addresses
(127.0.0.2, .3, .4 ...) sharing one port, as the pods behind one name would, each of which
can be stopped and started again on its address."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

from tests.support.http import http_client
from tests.support.scripted import Handler, ScriptedUpstream

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")


class Pod:
    """One scripted server on its own address; ``stop()`` and ``start()`` it at will."""

    def __init__(self, host: str, handlers: dict[str, Handler]) -> None:
        self.host = host
        self.server = ScriptedUpstream(dict(handlers))
        self.port = 0
        self._stack: AsyncExitStack | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def hits(self) -> int:
        return len(self.server.seen)

    async def start(self, port: int = 0) -> None:
        stack = AsyncExitStack()
        await stack.enter_async_context(self.server.running(self.host, port or self.port))
        self.port = self.server.port
        self._stack = stack

    async def stop(self) -> None:
        """Stop listening: new connections are refused (idle ones are the pool's to lose)."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()


@asynccontextmanager
async def pods(
    handlers: dict[str, Handler], hosts: tuple[str, ...] = HOSTS
) -> AsyncIterator[list[Pod]]:
    """A server on each of ``hosts``, all on one port (found by trying a few)."""
    for _ in range(20):
        started: list[Pod] = []
        try:
            for host in hosts:
                pod = Pod(host, handlers)
                await pod.start(started[0].port if started else 0)
                started.append(pod)
        except OSError:
            for pod in started:
                await pod.stop()
            continue
        try:
            yield started
        finally:
            for pod in started:
                await pod.stop()
        return
    raise AssertionError("no port free on every address")


def balanced_upstream(url: str, **upstream: Any) -> dict[str, Any]:
    """A config with one upstream named ``up`` behind ``/``, access log on."""
    return {
        "upstreams": {"up": {"url": url, **upstream}},
        "routes": [{"prefix": "/", "upstream": "up"}],
    }


async def upstreams_view(admin_url: str) -> dict[str, Any]:
    """The admin ``/upstreams`` document."""
    async with http_client(timeout=5) as client:
        response = await client.get(f"{admin_url}/upstreams")
        response.raise_for_status()
        view: dict[str, Any] = response.json()
        return view


async def states(admin_url: str, upstream: str = "up") -> dict[str, str]:
    """address -> state of each endpoint of ``upstream``, as the admin port shows them."""
    view = await upstreams_view(admin_url)
    return {e["address"]: e["state"] for e in view[upstream]["endpoints"]}


async def get_many(url: str, count: int, path: str = "/ok", concurrency: int = 1) -> list[int]:
    """The statuses of ``count`` GETs of ``path``, ``concurrency`` at a time."""
    statuses: list[int] = []
    async with http_client(timeout=10) as client:

        async def worker(share: int) -> None:
            for _ in range(share):
                statuses.append((await client.get(url + path)).status_code)

        shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
        await asyncio.gather(*(worker(share) for share in shares))
    return statuses
