"""The endpoints of one upstream: each address requests may go to, its own pool, and the
state the balancer, outlier detection, health checks and discovery agree on.

An endpoint is eligible for new requests only while it is healthy: not ejected (outlier.py),
not failing its health check (health.py), not draining (discovery.py: gone from DNS, its
in-flight requests finish on its pool, which closes after the last one). The eligible list
is rebuilt when a state changes, never per request.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import httpx

from .attempt import PoolTransport

# The failure kinds outlier detection counts (outlier.py); the ejection metric's reasons.
CONNECT = "connect"
RESET = "reset"
STATUS = "status"
EJECTION_REASONS = (CONNECT, RESET, STATUS)


class State(StrEnum):
    HEALTHY = "healthy"
    EJECTED = "ejected"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"


class EndpointObserver(Protocol):
    """Told of what happens to an upstream's endpoints (the metrics implement it)."""

    def ejection(self, upstream: str, reason: str) -> None: ...
    def health_check(self, upstream: str, result: str) -> None: ...
    def discovery_refresh(self, upstream: str, result: str) -> None: ...
    def connection_recycled(self, upstream: str, reason: str) -> None: ...


class NullEndpointObserver:
    def ejection(self, upstream: str, reason: str) -> None:
        pass

    def health_check(self, upstream: str, result: str) -> None:
        pass

    def discovery_refresh(self, upstream: str, result: str) -> None:
        pass

    def connection_recycled(self, upstream: str, reason: str) -> None:
        pass


def origin_of(scheme: str, host: str, port: int) -> tuple[str, str]:
    """(address, origin) of an endpoint: ``10.0.0.7:8080`` and ``http://10.0.0.7:8080``
    (an IPv6 address in brackets)."""
    shown = f"[{host}]" if ":" in host and not host.startswith("[") else host
    address = f"{shown}:{port}"
    return address, f"{scheme}://{address}"


class Endpoint:
    """One address of an upstream, with its own pool (the bare one, for statistics and
    health checks, and ``send``: the same wrapped for tracing)."""

    __slots__ = (
        "address",
        "checks_failed",
        "checks_passed",
        "consecutive_failures",
        "draining",
        "ejected_until",
        "ejections",
        "forgiven_at",
        "host",
        "in_flight",
        "origin",
        "pool",
        "port",
        "return_timer",
        "send",
        "unhealthy",
    )

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int,
        pool: PoolTransport,
        send: httpx.AsyncBaseTransport,
    ) -> None:
        self.host, self.port = host.strip("[]").lower(), port
        self.address, self.origin = origin_of(scheme, self.host, port)
        self.pool = pool
        self.send = send
        self.in_flight = 0
        self.consecutive_failures = 0
        self.ejected_until: float | None = None  # wall-clock time, for the admin view
        self.ejections = 0  # ejections in a row (the next lasts twice as long)
        self.forgiven_at = 0.0  # monotonic time after which a success resets ``ejections``
        self.return_timer: asyncio.TimerHandle | None = None
        self.unhealthy = False
        self.checks_passed = 0
        self.checks_failed = 0
        self.draining = False

    @property
    def ejected(self) -> bool:
        return self.ejected_until is not None

    @property
    def state(self) -> State:
        if self.draining:
            return State.DRAINING
        if self.ejected:
            return State.EJECTED
        if self.unhealthy:
            return State.UNHEALTHY
        return State.HEALTHY

    def view(self) -> dict[str, Any]:
        """What the admin ``/upstreams`` shows of it."""
        until = self.ejected_until
        return {
            "address": self.address,
            "state": self.state.value,
            "in_flight": self.in_flight,
            # Each request in flight holds one connection of the endpoint's pool.
            "pool": {"in_use": self.in_flight, "idle": self.pool.idle_connections()},
            "consecutive_failures": self.consecutive_failures,
            "ejected_until": (
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(until)) if until else None
            ),
        }


@dataclass
class EndpointCounts:
    healthy: int = 0
    ejected: int = 0
    unhealthy: int = 0
    draining: int = 0


class EndpointSet:
    """The endpoints of one upstream by address, and the eligible ones in a list."""

    def __init__(self, upstream: str, make: Callable[[str, int], Endpoint]) -> None:
        self.upstream = upstream
        self._make = make
        self.by_address: dict[str, Endpoint] = {}
        self.eligible: list[Endpoint] = []
        self._closing: set[asyncio.Task[None]] = set()

    def __iter__(self) -> Any:
        return iter(list(self.by_address.values()))

    def __len__(self) -> int:
        return len(self.by_address)

    def changed(self) -> None:
        """Rebuild the eligible list after a state change."""
        self.eligible = [
            e for e in self.by_address.values() if not (e.draining or e.ejected or e.unhealthy)
        ]

    def active(self) -> int:
        """Endpoints not draining: what shares of ejected endpoints are shares of."""
        return sum(1 for e in self.by_address.values() if not e.draining)

    def counts(self) -> EndpointCounts:
        counts = EndpointCounts()
        for endpoint in self.by_address.values():
            state = endpoint.state.value
            setattr(counts, state, getattr(counts, state) + 1)
        return counts

    def replace(self, targets: Iterable[tuple[str, int]]) -> tuple[int, int]:
        """Make the set ``targets`` (host, port): new ones are added, missing ones drain.
        Returns (added, removed)."""
        wanted = {origin_of("x", host.strip("[]"), port)[0]: (host, port) for host, port in targets}
        added = removed = 0
        for address, (host, port) in wanted.items():
            endpoint = self.by_address.get(address)
            if endpoint is None:
                self.by_address[address] = self._make(host, port)
                added += 1
            elif endpoint.draining:
                endpoint.draining = False  # back before it finished draining
                added += 1
        for address, endpoint in list(self.by_address.items()):
            if address not in wanted and not endpoint.draining:
                endpoint.draining = True
                removed += 1
                self.release(endpoint)
        self.changed()
        return added, removed

    def release(self, endpoint: Endpoint) -> None:
        """A request of ``endpoint`` ended (or it started draining): a draining endpoint
        with nothing in flight leaves the set and its pool closes."""
        if not endpoint.draining or endpoint.in_flight > 0:
            return
        if self.by_address.get(endpoint.address) is endpoint:
            del self.by_address[endpoint.address]
        if endpoint.return_timer is not None:
            endpoint.return_timer.cancel()
        task = asyncio.get_running_loop().create_task(endpoint.pool.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        for endpoint in list(self.by_address.values()):
            if endpoint.return_timer is not None:
                endpoint.return_timer.cancel()
            await endpoint.pool.aclose()
        self.by_address.clear()
        self.eligible = []
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
