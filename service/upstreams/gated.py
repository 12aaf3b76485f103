"""One pooled ``httpx.AsyncClient`` per upstream, with an admission gate in front of the pool.

The gate holds one slot per connection the upstream may use (``max_connections``). A request
takes a slot before it reaches the transport and gives it back when its response is closed,
so the transport's own pool never has waiters. That gives exact numbers for the pool
snapshot (in use, waiting, wait time) and one cancellation-safe place for pool timeouts.

**Pools that are not cancel-safe (httpcore, encode/httpcore#1093).** httpcore cleans up
after a cancellation, and returns a connection to its pool on close, under anyio shields,
which a plain asyncio cancellation (a client hanging up) goes straight through: the
connection would stay checked out of its pool for good while the gate freed its slot. For a
transport whose ``cancel_safe`` is False no cancellation is let through to it: each attempt
runs in a task of its own that a cancelled caller cancels through an anyio cancel scope, the
way httpcore expects, and the gate slot is returned once that task has ended
(``GatedTransport._attempt``); a response body is closed in a task of its own too, and a
cancellation is passed on only once that close finished (``_close_uncancellably``). This is
the one place that explains it; the README (*Transport choice*) has the measurements.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import anyio
import httpx

from ..errors import Reason, StaleConnectionError, classify
from ..retry_config import CONNECT_RETRY, STALE_CONNECTION
from .attempt import PoolTransport, WrappedStream, attempt_of
from .gate import Gate, GateTimeout

TransportWrapper = Callable[[str, httpx.AsyncBaseTransport], httpx.AsyncBaseTransport]
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


class PoolObserver(Protocol):
    def pool_wait(self, upstream: str, seconds: float) -> None: ...
    def pool_timeout(self, upstream: str) -> None: ...
    # A request sent again by the gate: ``reason`` stale_connection (the keep-alive race)
    # or connect (a refused connection, nothing sent).
    def retry(self, upstream: str, reason: str) -> None: ...


class NullPoolObserver:
    def pool_wait(self, upstream: str, seconds: float) -> None:
        pass

    def pool_timeout(self, upstream: str) -> None:
        pass

    def retry(self, upstream: str, reason: str) -> None:
        pass


@dataclass(frozen=True)
class PoolSnapshot:
    upstream: str
    in_use: int
    idle: int
    max: int
    waiting: int


# The body of a request that has none: replayable, so a stale keep-alive retry may resend it.
NO_BODY = httpx.ByteStream(b"")


class Body(httpx.AsyncByteStream):
    """A request body streamed from the client, read once."""

    def __init__(self, chunks: AsyncIterator[bytes]) -> None:
        self._chunks = chunks
        self.started = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        self.started = True
        return self._chunks


def _unsent(request: httpx.Request) -> bool:
    """Whether nothing of ``request``'s body has been read for sending yet."""
    stream = request.stream
    return not isinstance(stream, Body) or not stream.started


class _GatedStream(WrappedStream):
    """The response body; closing it returns the gate slot, after the transport is done."""

    def __init__(
        self, inner: httpx.AsyncByteStream, release: Callable[[], None], *, shield_close: bool
    ) -> None:
        super().__init__(inner)
        self._release = release
        self._shield_close = shield_close

    async def _close_inner(self) -> None:
        if self._shield_close:
            await _close_uncancellably(self._inner)
        else:
            await self._inner.aclose()

    async def _after_close(self) -> None:
        self._release()


async def _close_uncancellably(stream: httpx.AsyncByteStream) -> None:
    """Run ``stream.aclose()`` to its end even if this task is cancelled meanwhile (for
    pools that are not cancel-safe: see the module docstring)."""
    closing = asyncio.ensure_future(stream.aclose())
    cancelled: asyncio.CancelledError | None = None
    while not closing.done():
        try:
            await asyncio.shield(closing)
        except asyncio.CancelledError as exc:
            cancelled = exc
    closing.result()
    if cancelled is not None:
        raise cancelled


class _Lease:
    """One gate slot held by one request; released exactly once."""

    __slots__ = ("_gate", "detached", "released")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.detached = False
        self.released = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._gate.release()


async def _close_then_release(response: httpx.Response, lease: _Lease) -> None:
    try:
        await response.aclose()
    except Exception:
        pass
    finally:
        lease.release()


class GatedTransport(httpx.AsyncBaseTransport):
    """Admission gate + stale keep-alive retry around an inner transport."""

    def __init__(
        self,
        name: str,
        inner: PoolTransport,
        *,
        max_connections: int,
        pool_timeout: float | None,
        observer: PoolObserver,
        max_waiting: int | None = None,
        wrap: TransportWrapper | None = None,
        retry_connect: bool = True,
    ) -> None:
        """``retry_connect``: try a refused connect once more (not for a balancer, which
        tries another endpoint itself)."""
        self.name = name
        self.inner = inner
        self._retry_connect = retry_connect
        # Requests go through the wrapper (tracing: one client span per attempt); the bare
        # inner transport is kept for pool statistics and its lifecycle.
        self._send: httpx.AsyncBaseTransport = inner if wrap is None else wrap(name, inner)
        self._gate = Gate(max_connections, max_waiting)
        self._fragile = not inner.cancel_safe
        self._orphans: set[asyncio.Future[Any]] = set()
        self._pool_timeout = pool_timeout
        self._observer = observer

    def snapshot(self) -> PoolSnapshot:
        gate = self._gate
        return PoolSnapshot(
            upstream=self.name,
            in_use=gate.in_use,
            idle=self.inner.idle_connections(),
            max=gate.capacity,
            waiting=gate.waiting,
        )

    async def _acquire(self, pool_timeout: float | None) -> None:
        started = time.perf_counter()
        try:
            await self._gate.acquire(pool_timeout)
        except GateTimeout:
            self._observer.pool_timeout(self.name)
            raise httpx.PoolTimeout(f"no connection to {self.name} free in time") from None
        finally:
            self._observer.pool_wait(self.name, time.perf_counter() - started)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        # A route's own timeouts travel in the request, as httpx's do (Upstream.request).
        timeouts = request.extensions.get("timeout")
        await self._acquire(timeouts["pool"] if timeouts else self._pool_timeout)
        lease = _Lease(self._gate)
        try:
            response = await self._send_with_retry(request, lease)
        except BaseException:
            if not lease.detached:
                lease.release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        response.stream = _GatedStream(response.stream, lease.release, shield_close=self._fragile)
        return response

    async def _send_with_retry(self, request: httpx.Request, lease: _Lease) -> httpx.Response:
        try:
            return await self._attempt(request, lease)
        except StaleConnectionError:
            # Only the keep-alive race is retried, only once, and only when nothing can
            # have been applied twice: an idempotent method with no body to replay.
            replayable = request.stream is NO_BODY
            if request.method not in IDEMPOTENT_METHODS or not replayable:
                raise
            self._observer.retry(self.name, STALE_CONNECTION)
            info = attempt_of(request)
            info.fresh, info.reused = True, False
            info.resends += 1
            return await self._attempt(request, lease)
        except httpx.ConnectError as exc:
            # Refused (or not resolved): nothing was sent, so any method may go once more,
            # on a new connection; to a Service address it may reach another pod. An
            # upstream of many endpoints tries another endpoint instead (balance.py).
            info = attempt_of(request)
            if not (self._retry_connect and info.retry_connect) or not _unsent(request):
                raise
            if classify(exc) is not Reason.CONNECT:
                raise  # a TLS failure is raised as a connect error too: not retried
            info.retry_connect = False
            info.resends += 1
            self._observer.retry(self.name, CONNECT_RETRY)
            return await self._attempt(request, lease)

    async def _attempt(self, request: httpx.Request, lease: _Lease) -> httpx.Response:
        if not self._fragile:
            return await self._send.handle_async_request(request)
        # Not cancel-safe (encode/httpcore#1093, see the module docstring): the attempt runs
        # in a task of its own, cancelled through an anyio cancel scope.
        scope = anyio.CancelScope()

        async def run() -> httpx.Response | None:
            with scope:
                return await self._send.handle_async_request(request)
            return None

        attempt = asyncio.ensure_future(run())
        try:
            response = await asyncio.shield(attempt)
        except asyncio.CancelledError:
            scope.cancel()
            lease.detached = True
            self._orphans.add(attempt)
            attempt.add_done_callback(functools.partial(self._orphan_done, lease))
            raise
        assert response is not None
        return response

    def _orphan_done(self, lease: _Lease, attempt: asyncio.Future[Any]) -> None:
        self._orphans.discard(attempt)
        if attempt.cancelled() or attempt.exception() is not None or attempt.result() is None:
            lease.release()
            return
        closer = asyncio.ensure_future(_close_then_release(attempt.result(), lease))
        self._orphans.add(closer)
        closer.add_done_callback(self._orphans.discard)

    async def __aenter__(self) -> GatedTransport:
        await self.inner.__aenter__()
        return self

    async def aclose(self) -> None:
        await self.inner.aclose()
