"""Per-route retries: a failed attempt sent again to the same upstream, within a budget.

Each attempt goes through the upstream's client and its whole transport chain (gate, stale
keep-alive retry, tracing, pool), so each is a client span of its own and takes its own
pool slot; nothing reaches the client until the last attempt's response is chosen. An
attempt is sent again only when nothing can have gone to the client yet and its request can
be rebuilt exactly: a bodiless request, or one whose body was read in full within
``max_body_bytes`` before the first attempt. The budget bounds what retries add to an
upstream that is failing anyway (README, *Retries*).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass

import httpx

from .config import RouteConfig
from .errors import UPSTREAM_ERRORS, Reason, StaleConnectionError, classify
from .exchange import Exchange, ExchangeObserver
from .retry_config import STATUS_TRIGGERS, RetryConfig
from .upstreams.attempt import attempt_of
from .upstreams.gated import Body
from .upstreams.pools import Upstream

# What a failed attempt was, as a trigger of ``retry.on`` (statuses are matched directly).
_TRIGGERS: dict[Reason, str] = {
    Reason.CONNECT: "connect",
    Reason.CONNECT_TIMEOUT: "connect",
    Reason.RESET: "reset",
    Reason.READ_TIMEOUT: "read_timeout",
}
# The reason label of relay_upstream_retries_total for each trigger (stale_connection: the
# pool gate's own retry).
RETRY_REASONS: dict[str, str] = {
    "connect": "connect",
    "reset": "reset",
    "read_timeout": "read_timeout",
    **{status: f"status_{status}" for status in sorted(STATUS_TRIGGERS)},
}
BACKOFF_CAP = 10  # times backoff_seconds, as Envoy's default max_interval

BuildRequest = Callable[[Body | None], httpx.Request]


class RetryBudget:
    """Requests and retries of one upstream over the last ``WINDOW`` seconds, in one-second
    buckets (a sliding window that costs a clock read and an increment per request)."""

    WINDOW = 10
    __slots__ = ("_requests", "_retries", "_seconds")

    def __init__(self) -> None:
        self._seconds = [-1] * self.WINDOW
        self._requests = [0] * self.WINDOW
        self._retries = [0] * self.WINDOW

    def _bucket(self) -> tuple[int, int]:
        second = int(time.monotonic())
        index = second % self.WINDOW
        if self._seconds[index] != second:
            self._seconds[index] = second
            self._requests[index] = self._retries[index] = 0
        return second, index

    def request(self) -> None:
        self._requests[self._bucket()[1]] += 1

    def allow(self, percent: float, floor: int) -> bool:
        """Take one retry if the window has room: retries at most ``percent`` of requests,
        or ``floor``, whichever is more."""
        second, index = self._bucket()
        recent = [i for i, s in enumerate(self._seconds) if second - s < self.WINDOW]
        requests = sum(self._requests[i] for i in recent)
        retries = sum(self._retries[i] for i in recent)
        if retries + 1 > max(floor, requests * percent / 100):
            return False
        self._retries[index] += 1
        return True


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int
    on: frozenset[str]
    statuses: frozenset[int]
    methods: frozenset[str]
    budget_percent: float
    budget_min_retries: int
    backoff: float
    max_body: int

    @classmethod
    def of(cls, config: RetryConfig) -> RetryPolicy:
        return cls(
            attempts=config.attempts,
            on=frozenset(config.on),
            statuses=frozenset(int(t) for t in config.on if t in STATUS_TRIGGERS),
            methods=frozenset(config.methods),
            budget_percent=config.budget_percent,
            budget_min_retries=config.budget_min_retries,
            backoff=config.backoff_seconds,
            max_body=config.max_body_bytes,
        )

    def delay(self, retry: int) -> float:
        """Before retry ``retry`` (1, 2, ...): "equal jitter", between half and all of an
        interval that doubles per retry, capped, so that clients failing together do not
        come back together, and each retry still waits at least half its interval."""
        interval = self.backoff * min(1 << (retry - 1), BACKOFF_CAP)
        return interval / 2 + random.uniform(0, interval / 2)


@dataclass(frozen=True)
class RoutePlan:
    """What a route's requests do about retries: ``policy`` None for a route that never
    retries but shares an upstream with one that does (its requests count in the budget)."""

    policy: RetryPolicy | None
    budget: RetryBudget


def route_plans(routes: Iterable[RouteConfig]) -> Mapping[int, RoutePlan]:
    """The plan of every route whose upstream some route retries on, by ``id`` of the route
    (the router hands out these same objects); a route of any other upstream has none and
    costs nothing more per request."""
    routes = list(routes)
    budgets = {r.upstream: RetryBudget() for r in routes if r.retry.attempts}
    return {
        id(r): RoutePlan(RetryPolicy.of(r.retry) if r.retry.attempts else None, budgets[r.upstream])
        for r in routes
        if r.upstream in budgets
    }


def retry_reasons(routes: Iterable[RouteConfig]) -> dict[str, set[str]]:
    """The reason labels the retry policies of each upstream's routes can count, for the
    upstreams some route retries on (shown at 0 from the start, with the budget's refusals;
    the pool gate's own reasons are every upstream's)."""
    found: dict[str, set[str]] = {}
    for route in routes:
        if route.retry.attempts:
            found.setdefault(route.upstream, set()).update(RETRY_REASONS[t] for t in route.retry.on)
    return found


async def _buffered(chunks: AsyncIterator[bytes], limit: int) -> tuple[list[bytes], bool]:
    """The body's first chunks, up to ``limit`` bytes, and whether that was all of it."""
    read: list[bytes] = []
    size = 0
    async for chunk in chunks:
        read.append(chunk)
        size += len(chunk)
        if size > limit:
            return read, False
    return read, True


async def _chain(first: list[bytes], rest: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    for chunk in first:
        yield chunk
    async for chunk in rest:
        yield chunk


async def _once(data: bytes) -> AsyncIterator[bytes]:
    if data:
        yield data


class Retrying:
    """One exchange's attempts under its route's plan."""

    def __init__(
        self,
        plan: RoutePlan,
        upstream: Upstream,
        exchange: Exchange,
        observer: ExchangeObserver,
    ) -> None:
        self.plan = plan
        self.upstream = upstream
        self.exchange = exchange
        self.observer = observer

    async def send(
        self, method: str, body: AsyncIterator[bytes] | None, build: BuildRequest
    ) -> httpx.Response:
        """The response to show the client (or the last attempt's failure, raised).
        ``build`` makes the request of one attempt from its body (None: it has none)."""
        upstream = self.upstream
        self.plan.budget.request()
        policy = self.plan.policy
        if policy is None or method not in policy.methods:
            return await upstream.send(build(Body(body) if body is not None else None))
        data = b""
        if body is not None:
            chunks, whole = await _buffered(body, policy.max_body)
            if not whole:
                # Too large to keep: streamed as without retries, and never sent again.
                return await upstream.send(build(Body(_chain(chunks, body))))
            data = b"".join(chunks)
        return await self._attempts(policy, build, body is not None, data)

    async def _attempts(
        self, policy: RetryPolicy, build: BuildRequest, has_body: bool, data: bytes
    ) -> httpx.Response:
        resends = 0
        fresh = False
        connects = "connect" in policy.on  # then the pool gate leaves refused connects to it
        while True:
            request = build(Body(_once(data)) if has_body else None)
            if connects:
                attempt_of(request).retry_connect = False
            if resends:
                info = attempt_of(request)
                info.resends = resends
                # After a stale pooled connection, others may be just as stale.
                info.fresh = fresh
            try:
                response = await self.upstream.send(request)
            except UPSTREAM_ERRORS as exc:
                trigger = _TRIGGERS.get(classify(exc))
                if trigger is None or trigger not in policy.on:
                    raise
                if not self._may_retry(policy, resends):
                    raise
                fresh = isinstance(exc, StaleConnectionError)
            else:
                if response.status_code not in policy.statuses:
                    return response
                if not self._may_retry(policy, resends):
                    return response
                # Closed unread: a partly read connection is closed, not pooled.
                await response.aclose()
                trigger = str(response.status_code)
            resends += 1
            self.exchange.retries = resends
            self.exchange.retry_reason = RETRY_REASONS[trigger]
            self.observer.retrying(self.exchange)
            await asyncio.sleep(policy.delay(resends))

    def _may_retry(self, policy: RetryPolicy, resends: int) -> bool:
        if resends >= policy.attempts:
            return False
        if self.plan.budget.allow(policy.budget_percent, policy.budget_min_retries):
            return True
        self.observer.retry_denied(self.exchange)
        return False
